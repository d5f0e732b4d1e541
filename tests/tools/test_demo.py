"""`depthlab.tools.demo.run_demo` (what `depthlab demo` runs): trains, plots, samples; a rerun resumes to a no-op."""

from __future__ import annotations

from depthlab.cli import main
from depthlab.rundir import RunDir
from depthlab.tools.demo import run_demo

SMALL = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.seq_len=32",
         "--trainer.batch_size=4", "--trainer.max_steps=2", "--trainer.eval_batches=1", "--logging.progress=false",
         "--logging.tensorboard=false"]


def test_demo_trains_plots_samples_and_reruns_as_a_no_op(tiny_dataset, tmp_path, capsys):
    lines = []
    result = run_demo(tmp_path / "demo", [f"--data.path={tiny_dataset}", *SMALL], analysis=False, log=lines.append)
    assert result.run_dir == tmp_path / "demo" / "tiny" and RunDir(result.run_dir).latest_step() == 2
    assert result.variance_plot.is_file() and result.sample.startswith("ROMEO:") and result.analysis is None
    assert lines[0].startswith("[1/4]") and any(line.startswith("[3/4]") for line in lines)
    checkpoint = RunDir(result.run_dir).latest()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--skip-analysis", f"--data.path={tiny_dataset}",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "(resuming)" in out and "results: training run" in out
    assert RunDir(result.run_dir).latest() == checkpoint  # nothing retrained
