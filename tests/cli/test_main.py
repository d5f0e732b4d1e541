"""The command line: help everywhere, one-line errors with exit code 2, train → sample → export end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from depthlab.cli import COMMANDS, main
from tests.conftest import tiny_config


def test_every_subcommand_has_useful_help(capsys):
    for name, _ in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: depthlab {name}" in out and len(out) > 150, name


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "tiny", "--out", "{tmp}/r", "--model.n_layer=3"], "did you mean 'model.n_layers'"),
    (["train", "--preset", "nope", "--out", "{tmp}/r"], "unknown preset 'nope'"),
    (["train", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "config file not found"),
    (["train", "--preset", "tiny", "--out", "{tmp}/r", "--model.n_heads=3"], "must be divisible by model.n_heads"),
    (["train", "--preset", "tiny", "--out", "{tmp}/r", "--data.path={tmp}/nothing"], "{tmp}/nothing"),
    (["export", "{tmp}", "--out", "{tmp}/hf"], "is not a depthlab run"),
    (["sample", "{tmp}/no-such-model"], "no-such-model"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_train_sample_export_from_the_command_line(tiny_dataset, tmp_path, capsys):
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--trainer.seed=3"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["seed"] == 3 and saved["model"]["vocab_size"] == 300  # resolved from the data
    assert main(["train", str(config_file), "--out", str(run), "--trainer.seed=3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["sample", str(run), "--prompt", "thou art", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("thou art")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "depthlab", "train", "--preset", "tiny", "--out", str(tmp_path),
                           "--optimizer.lr=-1"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "depthlab train: error: optimizer.lr must be positive, got -1.0"
