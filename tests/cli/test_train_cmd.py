"""`depthlab train --resume`: the README's resume line, extending a finished run, and refusing model/data changes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from depthlab.cli import main
from depthlab.rundir import RunDir
from tests.conftest import tiny_config
from tests.reliability.conftest import snapshot


def _train(tmp_path, tiny_dataset, name, *overrides):
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4", *overrides)
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run = tmp_path / name
    assert main(["train", str(config_file), "--out", str(run), "--quiet"]) == 0
    return run


def _weights(run):
    return load_file(RunDir(run).latest() / "model.safetensors")


def _lrs(run):
    lines = [json.loads(line) for line in RunDir(run).metrics_path.read_text().splitlines()]
    return {r["step"]: r["lr"] for r in lines if "lr" in r}


def test_readme_resume_line_reads_the_runs_own_config(tiny_dataset, tmp_path, capsys):
    run = _train(tmp_path, tiny_dataset, "run")
    before = _weights(run)
    # the preset differs from the run's config (depth, width, data): resume uses the run's config.yaml
    assert main(["train", "--preset", "tiny", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert RunDir(run).latest_step() == 4
    assert all((_weights(run)[k] == v).all() for k, v in before.items())


def test_extending_a_finished_run_keeps_its_schedule(tiny_dataset, tmp_path, capsys):
    run = _train(tmp_path, tiny_dataset, "run")
    assert main(["train", "--out", str(run), "--resume", "--trainer.max_steps", "7", "-q"]) == 0
    saved = RunDir(run).read_config()
    assert saved["trainer"]["max_steps"] == 7 and saved["schedule"]["decay_steps"] == 4
    lrs, cfg = _lrs(run), tiny_config(tiny_dataset)
    floor = cfg.schedule.alpha_f * cfg.optimizer.lr
    assert [lrs[s] for s in (5, 6, 7)] == pytest.approx([floor] * 3)  # extra steps at the final rate
    # the same as one uninterrupted run planned that way (bitwise on CPU)
    straight = _train(tmp_path, tiny_dataset, "straight", "--trainer.max_steps=7", "--schedule.decay_steps=4")
    assert _lrs(straight) == pytest.approx(lrs)
    a, b = _weights(run), _weights(straight)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # a second extension keeps the first rule: decay still ends at step 4
    assert main(["train", "--out", str(run), "--resume", "--trainer.max_steps=8", "-q"]) == 0
    assert RunDir(run).read_config()["schedule"]["decay_steps"] == 4 and _lrs(run)[8] == pytest.approx(floor)


@pytest.mark.parametrize("override, message", [
    ("--model.d_model=64", "model.d_model: 32 → 64"),
    ("--trainer.seed=5", "trainer.seed: 0 → 5"),
    ("--trainer.batch_size=4", "trainer.batch_size: 8 → 4"),
    ("--trainer.max_steps=2", "trainer.max_steps may only grow"),
    ("--schedule.decay_steps=2", "schedule.decay_steps"),
])
def test_resume_refuses_model_and_data_order_changes(override, message, tiny_dataset, tmp_path, capsys):
    run = _train(tmp_path, tiny_dataset, "run")
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(["train", "--out", str(run), "--resume", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),  # training has no loss scaler
    (["--model.n_layers", "0"], "model.n_layers must be positive"),  # a space, not taken for the config file
])
def test_shared_options_map_to_the_config(argv, message, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    try:
        code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_seed_device_dtype_quiet_land_in_the_saved_config(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=1")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(config_file), "--out", str(tmp_path / "r"), "--seed", "7", "--device", "cpu",
                 "--dtype", "fp32", "-q", "--model.n_layers", "3"]) == 0
    saved = RunDir(tmp_path / "r").read_config()
    assert saved["trainer"]["seed"] == 7 and saved["trainer"]["device"] == "cpu"
    assert saved["trainer"]["dtype"] == "fp32" and saved["logging"]["progress"] is False
    assert saved["model"]["n_layers"] == 3
