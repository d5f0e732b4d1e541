"""`depthlab doctor`: prints the diagnosis and writes it as JSON for a trained run; one-line errors."""

from __future__ import annotations

import json

import pytest

from depthlab.cli import main


def test_cli_doctor_on_a_depthlab_run(depthlab_run, tmp_path, capsys):
    out = tmp_path / "diag.json"
    assert main(["doctor", str(depthlab_run), "--num-samples", "4", "--seq-len", "32", "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    diag = json.loads(out.read_text())
    assert diag["n_layers"] == 4 and diag["sample"]["num_samples"] == 4 and diag["sample"]["seq_len"] == 32
    levers = {lv["lever"]: lv for lv in diag["levers"]}
    assert levers["weight decay"]["model"] == "0.1" and levers["weight decay"]["status"] == "present"
    assert levers["GQA"]["model"] == "G = 2" and levers["long context"]["status"] == "absent"
    assert f"effective depth: {diag['effective_depth']} of 4 blocks useful" in printed


@pytest.mark.parametrize("argv, message", [(["/nonexistent/model"], "no such model"),
                                           (["--num-samples", "0"], "must be positive")])
def test_cli_doctor_bad_input_is_one_line(hf_folder, capsys, argv, message):
    args = ["doctor", *(argv if argv[0].startswith("/") else [str(hf_folder), *argv]), "--no-progress"]
    try:
        code = main(args)
    except SystemExit as e:  # argparse refuses a value outside the option's declared range while parsing
        code = e.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("depthlab")]
    assert len(err) == 1 and message in err[0]
