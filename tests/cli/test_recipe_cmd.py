"""`depthlab recipe`: a loadable YAML, one-line errors, and a warning (stderr and in the file) when the model is far
too big for the data."""

from __future__ import annotations

import pytest

from depthlab.cli import main
from depthlab.config import load_config


def test_cli_writes_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "sub" / "recipe.yaml"
    assert main(["recipe", "--layers", "8", "--active-params", "10M", "--budget-tokens", "50M",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# depthlab recipe") and "λ0.3" in text
    cfg = load_config(out)
    assert cfg.model.n_layers == 8 and cfg.model.moe.num_experts == 32 and cfg.trainer.max_steps == 96
    assert "wrote" in capsys.readouterr().out
    assert main(["recipe", "--layers", "4", "--active-params", "2M"]) == 0  # no --out: YAML on stdout
    assert "seq_len: 4096" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--layers", "0", "--active-params", "1B"],
                                  ["--layers", "8", "--active-params", "lots"],
                                  ["--layers", "8", "--active-params", "10M", "--budget-tokens", "x"]])
def test_cli_bad_input_is_one_line_exit_2(argv, capsys):
    assert main(["recipe", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("depthlab recipe: error:")


def test_cli_warns_and_names_the_commands_that_fix_it(tmp_path, capsys):
    out = tmp_path / "recipe.yaml"
    assert main(["recipe", "--layers", "32", "--active-params", "1.2B", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthlab recipe: warning: the model is far too big") and "\n" not in err
    assert "depthlab data prepare" in err and "# WARNING: the model is far too big" in out.read_text()
    assert load_config(out).model.n_layers == 32  # still a valid config
