"""SIGKILL at many points of a training run (then `--resume`) or of an analysis (then the same command again): the
result is bitwise the uninterrupted run's.

One run folder is killed seven times in a row, each time at a later point (`crash_hook.py` kills the process at an
exact place, once from outside), and resumed after each crash. After every crash, every checkpoint under a real name
must verify against its checksums; the final weights, loss curve and layer statistics must equal an uninterrupted
run's, with no step missing or repeated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthlab import checkpoint as ckpt
from depthlab.train.trainer import train
from tests.conftest import tiny_config
from tests.reliability.conftest import write_config

HOOK = Path(__file__).with_name("crash_hook.py")
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("--trainer.stats_moments=true", "--trainer.stats_grad_norms=true")

# (kill point, latest complete checkpoint step expected after the crash, a .tmp folder is expected to remain)
CHAIN = [
    ("log:2", None, False),     # torn metrics line before any checkpoint
    ("model:4", None, True),    # half of model.safetensors written
    ("rename:4", None, True),   # complete .tmp folder, never renamed
    ("batch:6", 4, False),      # between checkpoints
    ("prune:8", 8, False),      # renamed into place, older ones not yet pruned
    ("pause:10", 8, False),     # SIGKILL from outside while the process is alive and training
    ("state:12", 8, True),      # final checkpoint: trainer state written, meta.json not
]


def launch(args: list[str], kill: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPTHLAB_TEST_KILL": kill, "DEPTHLAB_TEST_MARKER": str(tmp / "paused"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HOOK), *args]
    if not kill.startswith("pause:"):
        return subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before reaching the pause point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    (tmp / "paused").unlink()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_checkpoints_sound(ckpt_dir: Path) -> list[int]:
    """Every checkpoint under a real name verifies; returns their steps. Temp folders are never listed."""
    real = sorted(p for p in ckpt_dir.glob("step_*") if not p.name.endswith(".tmp")) if ckpt_dir.exists() else []
    assert real == ckpt.list_checkpoints(ckpt_dir), "a folder under a real name is not a complete checkpoint"
    for path in real:
        ckpt.verify(path)
    return [int(p.name.split("_")[1]) for p in real]


@pytest.mark.slow
def test_sigkill_at_seven_points_then_resume_is_bitwise_identical(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, *OVERRIDES)
    config_file = write_config(cfg, tmp_path / "cfg.yaml")
    reference = tmp_path / "reference"
    train(cfg, reference)

    run = tmp_path / "run"
    for i, (kill, expected_latest, tmp_expected) in enumerate(CHAIN):
        args = ["train", str(config_file), "--out", str(run)] + (["--resume"] if i else [])
        proc = launch(args, kill, tmp_path)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        steps = assert_checkpoints_sound(run / "checkpoints")
        assert (steps[-1] if steps else None) == expected_latest, (kill, steps)
        assert any((run / "checkpoints").glob("*.tmp")) == tmp_expected, kill

    proc = launch(["train", str(config_file), "--out", str(run), "--resume"], "", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming at step 8" in proc.stdout
    assert assert_checkpoints_sound(run / "checkpoints") == [8, 12]
    assert not list((run / "checkpoints").glob("*.tmp")), "a stale temp checkpoint was left behind"

    a = load_file(reference / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    b = load_file(run / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = records(run / "metrics.jsonl")
    assert without_timing(metrics) == without_timing(records(reference / "metrics.jsonl"))
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 13))  # none missing, none repeated
    assert [r["step"] for r in metrics if "val_loss" in r] == [6, 12]
    stats = records(run / "layer_stats.jsonl")
    assert stats == records(reference / "layer_stats.jsonl")
    assert [r["step"] for r in stats] == [1, 3, 6, 9, 12]


@pytest.mark.slow
def test_sigkilled_analysis_resumes_from_its_saved_metrics(tiny_dataset, tmp_path):
    from depthlab.analysis.runner import run_analysis

    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.eval_interval=0")
    train(cfg, tmp_path / "run")
    metrics = "variance,angular,usefulness,causal"
    settings = {"metrics": metrics, "num_samples": 4, "seq_len": 16, "micro_batch_size": 2}
    reference = run_analysis(str(tmp_path / "run"), tmp_path / "reference", progress=False, log=lambda _: None,
                             **settings)
    out = tmp_path / "analysis"
    args = ["analyze", str(tmp_path / "run"), "--metrics", metrics, "--num-samples", "4", "--seq-len", "16",
            "--micro-batch-size", "2", "--out", str(out), "--no-progress", "--dtype", "fp32"]  # the API's CPU default
    proc = launch(args, "metric:2", tmp_path)  # variance and angular saved; results.json lists only variance
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["angular.json", "variance.json"]
    assert list(json.loads((out / "results.json").read_text())["metrics"]) == ["variance"]

    proc = launch(args, "", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "variance: already done, skipped" in proc.stdout and "angular: done" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["metrics"]) == metrics.split(",")
    def timeless(metrics: dict) -> dict:
        return {k: {f: x for f, x in v.items() if f != "seconds"} for k, v in metrics.items()}

    assert timeless(results["metrics"]) == timeless(json.loads(json.dumps(reference["metrics"])))
    assert results["summary"] == json.loads(json.dumps(reference["summary"]))
