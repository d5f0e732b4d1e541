"""The training loop: exact resume, refusals, fault handling, logs without duplicates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import depthlab.data
from depthlab import checkpoint as ckpt
from depthlab.errors import CheckpointError, ConfigError, TrainingError
from depthlab.train.trainer import train
from tests.conftest import tiny_config


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_weights(run):
    return load_file(ckpt.list_checkpoints(run / "checkpoints")[-1] / ckpt.MODEL_FILE)


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    result = train(tiny_config(tiny_dataset, "--trainer.stats_moments=true", "--trainer.stats_grad_norms=true"), run)
    return run, result


def test_run_folder_layout_and_logs(reference_run):
    run, result = reference_run
    assert result.step == 12 and math.isfinite(result.train_loss)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "layer_stats.jsonl", "checkpoints",
                                                "tokenizer.json"}
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000008", "step_000012"]  # keep 2
    train_lines = [r for r in lines(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert [r["step"] for r in lines(run / "metrics.jsonl") if "val_loss" in r] == [6, 12]
    stats = lines(run / "layer_stats.jsonl")
    assert [r["step"] for r in stats] == [1, 3, 6, 9, 12]
    layer = stats[-1]["layers"][1]
    assert {"out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm", "out_kurtosis", "grad_norm",
            "param_norm"} <= set(layer)
    assert stats[-1]["tokens"] == 12 * 8 * 32 and stats[-1]["sample_tokens"] == 8 * 32 and stats[-1]["final_norm_var"] > 0


def interrupt_at(monkeypatch, step_to_fail: int):
    real = depthlab.data.sample_batch

    def sample(*args, step, **kw):
        if step == step_to_fail:
            raise KeyboardInterrupt
        return real(*args, step=step, **kw)

    monkeypatch.setattr(depthlab.data, "sample_batch", sample)


def test_resume_is_bitwise_identical(reference_run, tiny_dataset, tmp_path, monkeypatch):
    ref_run, _ = reference_run
    cfg = tiny_config(tiny_dataset, "--trainer.stats_moments=true", "--trainer.stats_grad_norms=true")
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 9)  # after the step-8 checkpoint; steps 9 is lost and redone
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run)
    monkeypatch.undo()
    train(cfg, run, resume=True)
    a, b = final_weights(ref_run), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lines(run / "metrics.jsonl") == lines(ref_run / "metrics.jsonl") or [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines(run / "metrics.jsonl")] == [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines(ref_run / "metrics.jsonl")]
    assert lines(run / "layer_stats.jsonl") == lines(ref_run / "layer_stats.jsonl")


def test_existing_run_needs_resume_and_resume_needs_same_config(reference_run, tiny_dataset):
    run, _ = reference_run
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(tiny_dataset), run)
    with pytest.raises(ConfigError, match="config differs.*model.n_layers: 2 → 3"):
        train(tiny_config(tiny_dataset, "--trainer.stats_moments=true", "--trainer.stats_grad_norms=true",
                          "--model.n_layers=3"), run, resume=True)


def test_corrupt_checkpoint_is_refused(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_dataset, "--trainer.max_steps=4"), run)
    model_file = ckpt.list_checkpoints(run / "checkpoints")[-1] / ckpt.MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        train(tiny_config(tiny_dataset, "--trainer.max_steps=4"), run, resume=True)
    model_file.write_bytes(bytes(data[: len(data) // 2]))
    from depthlab.model.io import load_depthlab
    with pytest.raises(CheckpointError, match="checksum"):
        load_depthlab(run)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    from depthlab.model.transformer import Transformer

    run = tmp_path / "run"
    calls = {"n": 0}
    real = Transformer.aux_loss

    def poisoned(self):
        calls["n"] += 1
        return real(self) + (float("nan") if calls["n"] >= 6 else 0.0)  # forward 6 = step 6

    monkeypatch.setattr(Transformer, "aux_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 6.*step_000004"):
        train(tiny_config(tiny_dataset), run)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000004"]
    ckpt.verify(ckpt.list_checkpoints(run / "checkpoints")[-1])


def test_failed_save_keeps_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt.save_file
    calls = {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        train(tiny_config(tiny_dataset), run)
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert [p.name for p in saved] == ["step_000004"] and ckpt.verify(saved[0])["step"] == 4
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_gradient_accumulation_matches_full_batch(tiny_dataset, tmp_path):
    full = train(tiny_config(tiny_dataset, "--trainer.max_steps=3"), tmp_path / "a")
    accum = train(tiny_config(tiny_dataset, "--trainer.max_steps=3", "--trainer.micro_batch_size=2"), tmp_path / "b")
    assert abs(full.train_loss - accum.train_loss) < 1e-5 and abs(full.val_loss - accum.val_loss) < 1e-4
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # Adam amplifies float-order noise a little


def test_variance_profile_plot_of_a_run(reference_run, tmp_path):
    from depthlab.train.plots import plot_variance_profile, read_layer_stats

    run, _ = reference_run
    out = plot_variance_profile(run, tmp_path / "v.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert len(read_layer_stats(run)) == 5
    assert plot_variance_profile(tmp_path) is None  # no statistics, no figure
