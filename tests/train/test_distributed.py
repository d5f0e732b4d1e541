"""Two data-parallel CPU ranks (gloo, via torchrun) match one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from depthlab import checkpoint as ckpt
from depthlab.train.trainer import train
from tests.conftest import tiny_config


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.micro_batch_size=2")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    single = train(cfg, tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "depthlab",
         "train", str(config_file), "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, check=False, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(ckpt.list_checkpoints(tmp_path / "single" / "checkpoints")[-1] / ckpt.MODEL_FILE)
    b = load_file(ckpt.list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1] / ckpt.MODEL_FILE)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    ddp_lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in ddp_lines if "loss" in r][-1]
    assert abs(last["loss"] - single.train_loss) < 1e-4
    # statistics are all-reduced over both ranks: the same tokens as one process
    s1 = [json.loads(x) for x in (tmp_path / "single" / "layer_stats.jsonl").read_text().splitlines()]
    s2 = [json.loads(x) for x in (tmp_path / "ddp" / "layer_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in s1] == [r["step"] for r in s2]
    assert s2[-1]["sample_tokens"] == s1[-1]["sample_tokens"]
    assert abs(s2[-1]["layers"][1]["out_var"] - s1[-1]["layers"][1]["out_var"]) < 1e-3 * s1[-1]["layers"][1]["out_var"]
    assert torch.isfinite(torch.tensor(last["loss"]))


@pytest.mark.slow
def test_fsdp_two_ranks_train_save_and_resume(tiny_dataset, tmp_path):
    """FSDP2 sharding on 2 gloo ranks: checkpoints hold full weights, and resuming continues the run."""
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.save_interval=2", "--trainer.fsdp=true")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "depthlab",
               "train", str(config_file), "--out", str(tmp_path / "fsdp")]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = train(tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.save_interval=2"), tmp_path / "one")
    a = load_file(ckpt.list_checkpoints(tmp_path / "one" / "checkpoints")[-1] / ckpt.MODEL_FILE)
    b = load_file(ckpt.list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1] / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    del single
    shutil.rmtree(ckpt.list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1])  # back to step 2
    proc = subprocess.run(command + ["--resume"], capture_output=True, text=True, check=False, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = load_file(ckpt.list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1] / ckpt.MODEL_FILE)
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-4
