"""`depthlab theory`: results and figures written, one-line errors, choices equal to the simulator's."""

from __future__ import annotations

import json

import pytest

from depthlab.cli import main


def test_cli_writes_results_and_figures(tmp_path, capsys):
    out = tmp_path / "th"
    code = main(["theory", "--mask", "iid", "--norm", "pre", "--densities", "1,1/4", "--layers", "4",
                 "--d-model", "16", "--seeds", "2", "--tokens", "8", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["densities"] == [1.0, 0.25] and len(data["runs"][0]["var"][0]) == 5
    assert data["provenance"]["command"].startswith("depthlab theory --mask iid")
    assert (out / "iid_pre.png").stat().st_size > 0 and (out / "summary.png").exists()
    printed = capsys.readouterr().out
    assert "for 4 layers × d=16" in printed and "Var growth" in printed


@pytest.mark.parametrize("argv", [["--densities", "0,2"], ["--densities", "abc"], ["--layers", "0"],
                                  ["--mask", "nope"], ["--mask", "routing", "--densities", "0.3"]])
def test_cli_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    try:
        code = main(["theory", "--layers", "2", "--d-model", "8", "--out", str(tmp_path), *argv])
    except SystemExit as e:  # argparse rejects malformed values itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


def test_cli_choices_match_the_simulator():
    from depthlab.cli import theory_cmd
    from depthlab.theory.simulate import MASKS, NORMS

    assert theory_cmd.MASKS == MASKS and theory_cmd.NORMS == NORMS
