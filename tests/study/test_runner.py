"""The study runner end to end on tiny models: runs in subprocesses, failures isolated, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from depthlab.study.report import aggregate
from depthlab.study.runner import launch_command, run_study, study_status
from depthlab.study.spec import load_spec


def micro(dataset, runs, **measure):
    """A study of 2-block-or-smaller d=32 models (a dozen steps take about a second)."""
    return {"name": "micro", "runs": runs,
            "config": {"data.path": str(dataset), "model": {"d_model": 32, "n_heads": 2, "seq_len": 32},
                       "trainer": {"batch_size": 8, "max_steps": 12, "save_interval": 4, "keep_last": 3,
                                   "eval_interval": 6,
                                   "eval_batches": 2, "stats_interval": 3, "log_interval": 1, "dtype": "fp32"},
                       "schedule.warmup_steps": 3, "logging.tensorboard": False},
            "measure": {"analysis_samples": 2, "analysis_seq_len": 32, **measure}}


@pytest.fixture(autouse=True)
def _one_thread_per_run(monkeypatch):
    """Run subprocesses single-threaded: two OpenMP threads per process thrash on a loaded 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_micro_study_end_to_end_with_a_failing_run(tiny_dataset, tmp_path):
    spec = load_spec(micro(tiny_dataset, [{"name": "L1", "model.n_layers": 1},
                                          {"name": "L2", "model.n_layers": 2},
                                          {"name": "broken", "model.vocab_size": 100}],
                           analysis=["variance", "usefulness", "moe"], perplexity=True, dynamics=[1 / 3, 2 / 3],
                           dynamics_analysis=["usefulness", "moe"]))  # moe: skipped for these dense runs
    out = tmp_path / "study"
    logged = []
    states = run_study(spec, out, jobs=2, log=logged.append)
    assert states == {"L1": "done", "L2": "done", "broken": "failed"}
    assert study_status(out) == states
    failed = json.loads((out / "runs" / "broken" / "failed.json").read_text())
    assert "model.vocab_size (100) is smaller than the dataset's tokenizer vocabulary" in failed["error"]
    assert "Traceback" in failed["traceback"] and "vocabulary" in (out / "runs" / "broken" / "log.txt").read_text()
    for name, n_layers in (("L1", 1), ("L2", 2)):
        run = out / "runs" / name
        done = json.loads((run / "done.json").read_text())
        assert done["step"] == 12 and done["measured"] == ["baselines", "eval", "analysis", "dynamics"]
        assert len(done["load_average"]["start"]) == 3 and done["seconds"] > 0
        baselines = json.loads((run / "baselines.json").read_text())
        assert 0 < baselines["bigram"] < baselines["unigram"] and baselines["tokens"] == 2 * 8 * 32
        for step in (4, 8):  # the checkpoints at 1/3 and 2/3 of training, kept by keep_last=3
            early = json.loads((run / "dynamics" / f"step_{step:06d}" / "results.json").read_text())
            assert list(early["metrics"]) == ["usefulness"] and early["model"]["ref"].endswith(f"step_{step:06d}")
        analysis = json.loads((run / "analysis" / "results.json").read_text())
        assert len(analysis["metrics"]["usefulness"]["useful"]) == n_layers and "moe" not in analysis["metrics"]
        assert json.loads((run / "eval" / "results.json").read_text())["perplexity"]["tokens"] > 0
        assert steps(run / "layer_stats.jsonl") == [1, 3, 6, 9, 12]
    rows = {r["label"]: r for r in aggregate(out)["rows"]}
    assert set(rows) == {"L1", "L2"}
    useful = json.loads((out / "runs" / "L2" / "analysis" / "results.json").read_text())["metrics"]["usefulness"]
    assert rows["L2"]["metrics"]["usefulness"]["mean"] == useful["score"]
    assert [[p["step"] for p in d] for d in rows["L2"]["dynamics"]] == [[4, 8, 12]]
    assert rows["L2"]["dynamics"][0][-1]["continuous_usefulness"] == useful["continuous_score"]

    before = (out / "runs" / "L1" / "done.json").stat().st_mtime_ns
    logged.clear()
    assert run_study(spec, out, jobs=1, log=logged.append)["broken"] == "failed"  # retried, fails again
    again = json.loads((out / "runs" / "broken" / "failed.json").read_text())
    assert again["attempt"] == 2 and again["seconds"] > failed["seconds"] > 0  # wall time summed over attempts
    assert "skip   L1 (done)" in logged and "skip   L2 (done)" in logged
    assert (out / "runs" / "L1" / "done.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_killed_study_resumes_the_interrupted_run(tiny_dataset, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(micro(tiny_dataset, [
        {"name": "quick", "trainer.max_steps": 6},
        {"name": "long", "trainer.max_steps": 80, "trainer.save_interval": 5}], analysis=["variance"])))
    out = tmp_path / "study"
    parent = subprocess.Popen([sys.executable, "-m", "depthlab", "study", "run", str(spec_path), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    long = out / "runs" / "long"
    deadline = time.time() + 240
    while not (list((long / "checkpoints").glob("step_*[0-9]")) and (long / "running.json").exists()):
        assert parent.poll() is None and time.time() < deadline, "the long run never checkpointed"
        time.sleep(0.05)
    os.kill(json.loads((long / "running.json").read_text())["pid"], signal.SIGKILL)
    output, _ = parent.communicate(timeout=120)
    assert parent.returncode == 1, output
    assert "FAILED long: process killed by signal 9" in output
    assert study_status(out) == {"quick": "done", "long": "failed"}
    checkpoint_steps = sorted(int(p.name[5:]) for p in (long / "checkpoints").glob("step_*[0-9]"))
    assert checkpoint_steps and checkpoint_steps[-1] < 80
    quick_done = (out / "runs" / "quick" / "done.json").stat().st_mtime_ns

    logged = []
    assert run_study(spec_path, out, log=logged.append) == {"quick": "done", "long": "done"}
    assert "skip   quick (done)" in logged
    assert (out / "runs" / "quick" / "done.json").stat().st_mtime_ns == quick_done
    assert f"resuming at step {checkpoint_steps[-1]}" in (long / "log.txt").read_text()
    # continued without duplicate or missing lines
    train_lines = [json.loads(line) for line in (long / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in train_lines if "loss" in x] == list(range(1, 81))
    assert steps(long / "layer_stats.jsonl") == [1, *range(3, 81, 3)]


def test_launch_commands():
    assert launch_command("R", 1, python="py") == ["py", "-m", "depthlab.study.runner", "R"]
    assert launch_command("R", 4, python="py") == ["py", "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node=4", "-m", "depthlab.study.runner", "R"]


@pytest.mark.slow
def test_only_one_run_under_torchrun(tiny_dataset, tmp_path):
    """--only runs just the named run; --nproc-per-node 2 trains it on two gloo ranks (rank 0 writes the markers);
    overrides reach every run's config."""
    spec = load_spec(micro(tiny_dataset, [{"name": "a", "trainer.max_steps": 4}, {"name": "b"}]))
    out = tmp_path / "study"
    assert run_study(spec, out, only=["a"], nproc_per_node=2, overrides={"trainer.eval_batches": 1},
                     log=lambda _: None) == {"a": "done"}
    assert yaml.safe_load((out / "runs" / "a" / "config.yaml").read_text())["trainer"]["eval_batches"] == 1
    assert study_status(out) == {"a": "done", "b": "pending"}
    assert "2 rank(s) on cpu" in (out / "runs" / "a" / "log.txt").read_text()
    assert json.loads((out / "runs" / "a" / "done.json").read_text())["step"] == 4


def test_more_jobs_than_runs_allocates_no_slots():
    """`study run --jobs 10^11` used to build 10^11 job slots (MemoryError after the study folder was written)."""
    from depthlab.study.runner import _run_pool

    _run_pool([], 10**11, 1, print)
