"""`depthlab config`: one-line errors with a suggestion, and the key listing."""

from __future__ import annotations

from depthlab.cli import main


def test_cli_one_line_error_and_exit_2(capsys):
    assert main(["config", "tiny", "--model.n_layer=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'model.n_layers'" in err
    assert main(["config", "--keys"]) == 0
    assert "model.n_kv_heads" in capsys.readouterr().out
