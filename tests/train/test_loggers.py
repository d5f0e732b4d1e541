"""TensorBoard and W&B receive the per-layer statistics (same keys in both); a missing logger is one warning line."""

from __future__ import annotations

import builtins
import json
import sys
import types

import pytest

from depthlab.rundir import RunDir
from depthlab.train.loggers import layer_scalars, metric_scalars
from depthlab.train.trainer import train
from tests.conftest import tiny_config

RECORD = {"step": 3, "tokens": 96, "sample_tokens": 256, "final_norm_var": 1.5, "moe_diversity": float("nan"),
          "layers": [{"layer": 0, "out_var": 0.1, "attn_norm": 2.0, "moe_load": [0.25, 0.75]},
                     {"layer": 1, "out_var": 0.4, "attn_norm": 3.0, "moe_load": [0.5, 0.5]}]}


def test_tags_per_layer_and_statistic():
    scalars, lists = layer_scalars(RECORD)
    assert scalars == {"stats/sample_tokens": 256.0, "stats/final_norm_var": 1.5, "out_var/layer_00": 0.1,
                       "attn_norm/layer_00": 2.0, "out_var/layer_01": 0.4, "attn_norm/layer_01": 3.0}
    assert lists == {"moe_load/layer_00": [0.25, 0.75], "moe_load/layer_01": [0.5, 0.5]}  # NaN dropped above
    assert metric_scalars({"step": 1, "tokens": 8, "loss": 2.0, "val_loss": 1.0}) == {"train/loss": 2.0,
                                                                                      "val/val_loss": 1.0}


def _stats_lines(run):
    return [json.loads(line) for line in RunDir(run).layer_stats_path.read_text().splitlines()]


def test_tensorboard_gets_every_layer_statistic_and_a_profile(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_config(tiny_dataset, "--trainer.max_steps=6", "--logging.tensorboard=true",
                      "--logging.profile_every=2"), run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    line = _stats_lines(run)[-1]
    expected, _ = layer_scalars(line)
    assert set(expected) <= set(tags["scalars"]) and {"train/loss", "val/val_loss"} <= set(tags["scalars"])
    assert {"out_var/layer_00", "out_var/layer_01", "ffn_norm/layer_01", "stats/final_norm_var"} <= set(expected)
    logged = {e.step: e.value for e in events.Scalars("out_var/layer_01")}
    assert logged[line["step"]] == pytest.approx(line["layers"][1]["out_var"], rel=1e-6)
    assert "profile/layers" in tags["images"]
    lines = [r["step"] for r in _stats_lines(run)]
    assert lines == [1, 3, 6]
    assert [e.step for e in events.Images("profile/layers")] == [1, 6]  # every second line, the first included


def test_wandb_gets_the_same_keys(tiny_dataset, tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(log=lambda data, step: logged.append((step, data)),
                                                finish=lambda: None),
        Histogram=lambda values: ("histogram", values), Image=lambda figure: ("image", figure))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    train(tiny_config(tiny_dataset, "--trainer.max_steps=3", "--logging.wandb_project=p"), run)
    line = _stats_lines(run)[-1]
    expected, _ = layer_scalars(line)
    at_step = {}
    for step, data in logged:
        at_step.setdefault(step, {}).update(data)
    assert {k: at_step[line["step"]][k] for k in expected} == expected
    first = _stats_lines(run)[0]["step"]
    assert at_step[first]["profile/layers"][0] == "image"  # logging.profile_every=10: the first line only
    assert "profile/layers" not in at_step[line["step"]]


def test_a_missing_logger_is_one_warning_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_loggers(name, *args, **kwargs):
        if name in ("wandb", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_loggers)
    result = train(tiny_config(tiny_dataset, "--trainer.max_steps=2", "--logging.tensorboard=true",
                               "--logging.wandb_project=p"), tmp_path / "run")
    assert result.step == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all(w.startswith("depthlab train: warning: ") for w in warnings)
    assert "tensorboard is not installed" in warnings[0] and "wandb is not installed" in warnings[1]
    assert not (tmp_path / "run" / "tensorboard").exists()
