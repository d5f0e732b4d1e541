"""Nothing lost, nothing overwritten: folder replacement, run-folder locks, Ctrl-C/SIGTERM, checkpoint pruning, JSON.

- `export`/`prune` replace an existing folder only with --overwrite, atomically: a failure mid-write leaves the old
  folder intact and no temporary folder behind, and a user folder named like a temporary one is never touched.
- A second writer of a run folder is refused with one line naming the holder; a lock left by a killed process is
  stale and taken over.
- SIGTERM or SIGINT during training stops after the current step with a checkpoint, prints the exact resume command,
  and that command finishes the run bitwise equal to an uninterrupted one.
- A kill in the middle of pruning an old checkpoint never leaves a half-deleted folder listed as a checkpoint.
- metrics.jsonl never holds a NaN literal (strict JSON parsers accept every line).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthlab import checkpoint as ckpt
from depthlab.cli import main
from depthlab.rundir import RunDir, folder_lock
from depthlab.train.trainer import JsonlLog, train
from tests.conftest import tiny_config
from tests.reliability.conftest import snapshot, write_config


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    train(tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.eval_interval=0"), root / "run")
    return root / "run"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_export_replaces_only_with_overwrite_and_atomically(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    user_tmp = tmp_path / "hf.tmp"  # a user folder that the old code deleted as its "temporary" folder
    user_tmp.mkdir()
    (user_tmp / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(out)]) == 0
    capsys.readouterr()  # transformers' progress bar
    first = snapshot(out)
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists and is not empty" in one_line(capsys) and snapshot(out) == first

    import depthlab.model.hf

    def torn_save(hf_model, tokenizer, folder):  # a failure halfway through writing the new folder
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(depthlab.model.hf, "save_pretrained", torn_save)
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    err = one_line(capsys)
    assert "disk full" in err and f"{out} is unchanged" in err
    assert snapshot(out) == first, "a failed replacement damaged the existing folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp"], "a temporary folder was left behind"
    assert (user_tmp / "keep.txt").read_text() == "mine"
    monkeypatch.undo()

    (out / "stale.txt").write_text("from an older export")
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp"]


def test_export_never_replaces_the_run_home_or_current_folder(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(run)
    for out in (run, run.parent, run / "checkpoints", Path.cwd(), Path.home(), Path("..")):
        before = snapshot(run)
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
        assert "refusing to replace" in one_line(capsys)
        assert snapshot(run) == before
    for out in ("/", ""):
        assert main(["export", str(run), "--out", out, "--overwrite"]) == 2
        one_line(capsys)


def test_second_writer_is_refused_and_a_dead_holder_is_stale(tiny_dataset, tmp_path, capsys):
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=2", "--trainer.eval_interval=0")
    config_file = write_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from depthlab.rundir import folder_lock\n"
        f"with folder_lock({str(out)!r}, 'train'):\n    print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(config_file), "--out", str(out)]) == 2
        err = one_line(capsys)
        assert f"{out} is in use by 'depthlab train' (pid {holder.pid}" in err
        assert not RunDir(out).started() and not RunDir(out).metrics_path.exists()  # nothing written
    finally:
        holder.kill()  # dies holding the lock: the lock file stays, but the kernel has released it
        holder.wait()
    assert (out / RunDir.LOCK).exists()
    assert main(["train", str(config_file), "--out", str(out)]) == 0
    assert not (out / RunDir.LOCK).exists() and RunDir(out).latest_step() == 2


def test_lock_is_reentrant_in_one_process_and_removes_a_folder_it_created_empty(tmp_path):
    out = tmp_path / "a" / "b"
    with folder_lock(out, "analyze"), folder_lock(out, "train"):
        assert (out / RunDir.LOCK).exists()
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_step_saves_and_the_printed_command_resumes(sig, tiny_dataset, tmp_path, capsys,
                                                                          monkeypatch):
    cfg = tiny_config(tiny_dataset, "--trainer.save_interval=0")  # no checkpoint before the end but the signal's
    config_file = write_config(cfg, tmp_path / "cfg.yaml")
    train(cfg, tmp_path / "reference")
    out = tmp_path / "run"

    import depthlab.data

    real = depthlab.data.sample_batch

    def sample_batch(*args, step: int, **kw):  # the signal arrives while step 5 is being computed
        if step == 4:
            os.kill(os.getpid(), sig)
        return real(*args, step=step, **kw)

    monkeypatch.setattr(depthlab.data, "sample_batch", sample_batch)
    assert main(["train", str(config_file), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name} after step 5 of 12" in err
    assert RunDir(out).latest_step() == 5 and ckpt.verify(RunDir(out).latest())["step"] == 5
    assert not (out / RunDir.LOCK).exists()
    command = shlex.split(err.split("resume with: ")[1])
    assert command == ["depthlab", "train", str(config_file), "--out", str(out), "--resume"]

    monkeypatch.undo()
    assert main(command[1:]) == 0
    a = load_file(tmp_path / "reference" / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    b = load_file(out / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_listed(tmp_path, monkeypatch):
    weights = {"w": torch.ones(3)}
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, weights, {"step": step}, keep_last=2)

    real_rmtree = ckpt.shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):  # dies with the weights deleted and meta.json still there
        if not (Path(path) / ckpt.META_FILE).exists():
            return real_rmtree(path, *args, **kwargs)
        for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
            (Path(path) / name).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, weights, {"step": 3}, keep_last=2)
    monkeypatch.undo()
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.verify(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".step_000001.")]  # hidden, not listed


def test_jsonl_logs_have_no_nan_literals(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl", None)
    log.write({"step": 1, "loss": math.nan, "val_loss": math.inf, "lr": 0.1})
    log.close()

    def refuse(name):
        raise ValueError(f"{name} in JSON")

    line = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse)
    assert line == {"step": 1, "loss": None, "val_loss": None, "lr": 0.1}


def test_prepare_removes_temporary_files_of_a_killed_prepare(tiny_dataset, tmp_path):
    from depthlab.data import prepare_data

    out = tmp_path / "prepared"
    out.mkdir()
    (out / ".tokenizer.json.999999.tmp").write_text("left by a SIGKILLed prepare")
    prepare_data(Path(tiny_dataset).parent / "corpus", out, vocab_size=300, val_fraction=0.2)
    assert not list(out.glob("*.tmp")) and (out / "meta.json").exists()


def test_sigterm_during_analysis_keeps_finished_metrics_and_prints_the_same_command(run, tmp_path, capsys,
                                                                                    monkeypatch):
    from depthlab.analysis import suite

    real = suite.METRICS["angular"]

    def angular(*args, **kwargs):  # SIGTERM arrives while the second metric runs
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setitem(suite.METRICS, "angular", angular)
    argv = ["analyze", str(run), "--metrics", "variance,angular", "--seq-len", "16", "--out", str(tmp_path / "a"),
            "-q"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("resume with: " + shlex.join(["depthlab", *argv]))
    saved = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]
    assert list(saved) == ["variance"] and not (tmp_path / "a" / RunDir.LOCK).exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert "variance: already done, skipped" in capsys.readouterr().out
