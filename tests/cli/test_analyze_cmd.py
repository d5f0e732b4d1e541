"""`depthlab analyze` end to end on a tiny HF folder: results, tables and plots, resume, one-line errors."""

from __future__ import annotations

import json

import pytest

from depthlab.cli import main


def _error_lines(stderr: str) -> list[str]:
    """depthlab's own messages (transformers may draw a weight-loading progress bar on stderr too)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("depthlab")]


def test_cli_end_to_end_and_resume(hf_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", str(hf_folder), "--metrics", "variance,angular,usefulness,causal,permutation,moe",
            "--num-samples", "3", "--seq-len", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 2  # moe asked for explicitly on a dense model: it fails, the others are saved
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "moe" in err[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"variance", "angular", "usefulness", "causal", "permutation"}
    assert len(results["model"]["weights_sha256"]) == 64 and results["sample"]["token_sha256"]
    assert results["settings"]["seq_len"] == 16 and results["versions"]["depthlab"]
    for name in ("variance.png", "usefulness.png", "causal.png", "permutation.png", "usefulness.csv",
                 "causal_matrix.csv", "metrics/usefulness.json"):
        assert (out / name).exists(), name
    argv[3] = "variance,usefulness"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "variance: already done, skipped" in printed and "effective depth:" in printed


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "nonsense"], "unknown metric"),
    (["--seq-len", "500"], "exceeds the model's context"),
    (["--seq-len", "1"], "argument --seq-len: must be >= 2, got 1"),
    (["--option", "usefulness.nope=1"], "has no option"),
    (["--fit-samples", "0"], "argument --fit-samples: must be positive, got 0"),
    (["--fit-samples", "100000"], "fit windows were requested"),
])
def test_cli_bad_input_is_one_line_exit_2(hf_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        rc = main(["analyze", str(hf_folder), "--out", str(out), "--num-samples", "2", "--no-progress", *argv])
    except SystemExit as e:  # argparse refuses a value outside the option's declared range while parsing
        rc = e.code
    err = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "results.json").exists() and not (out / "metrics").exists()  # nothing written


def test_json_on_stdout_is_strict_json(hf_folder, tmp_path, capsys):
    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    assert main(["analyze", str(hf_folder), "--metrics", "variance,causal", "--num-samples", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "a"), "--json", "-q"]) == 0
    results = json.loads(capsys.readouterr().out, parse_constant=no_nan)  # only the JSON, nothing else
    assert set(results["metrics"]) == {"variance", "causal"} and results["provenance"]["command"].startswith(
        "depthlab analyze")
