"""`depthlab study run|status|list|show`: one-line errors that create nothing, the built-in listing and run names."""

from __future__ import annotations

import yaml

from depthlab.cli import main


def test_cli_bad_input_and_listing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "grid": {"model.depth": [2], "trainer.steps": [3]}}))
    assert main(["study", "run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid keys that are not config keys: model.depth, trainer.steps" in err
    assert not (tmp_path / "o").exists()
    assert main(["study", "status", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert main(["study", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("depth", "weight_decay", "context", "gqa", "moe", "recipe"):
        assert f"\n{name}: " in "\n" + listing
    assert main(["study", "show", "depth", "--scale", "paper"]) == 0
    assert capsys.readouterr().out.split() == ["L12", "L16", "L24", "L32"]
    assert main(["study", "run", "depth", "--only", "L99", "--out", str(tmp_path / "d")]) == 2
    assert "no run named 'L99'" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["study", "run", "depth", "--model.d_modl=8", "--out", str(tmp_path / "d")]) == 2
    assert "unknown config key 'model.d_modl' (did you mean 'model.d_model'?)" in capsys.readouterr().err
    assert main(["study", "run", "depth", "--model.d_model=66", "--out", str(tmp_path / "d")]) == 2
    assert "run 'L2__s0' of study 'depth': model.d_model (66) must be divisible by model.n_heads (4)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "d").exists()
