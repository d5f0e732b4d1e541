"""`depthlab analyze --metrics lens,tuned_lens,branches`: tables, figures and the cached translators."""

from __future__ import annotations

import csv
import json

from depthlab.cli import main


def test_analyze_writes_lens_and_branch_outputs(depthlab_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", str(depthlab_run), "--metrics", "lens,tuned_lens,branches", "--option", "tuned_lens.steps=5",
            "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert main([*args, "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"lens", "tuned_lens", "branches"}
    tuned = results["metrics"]["tuned_lens"]
    assert tuned["translators"] == str(out / "tuned_lens.safetensors") and not tuned["reused"]
    rows = list(csv.DictReader((out / "lens.csv").open()))
    assert len(rows) == 4 and float(rows[-1]["kl"]) == 0.0
    assert len(list(csv.DictReader((out / "branches.csv").open()))) == 4
    for name in ("lens.png", "tuned_lens.png", "branches.png", "branches_attn_causal.png",
                 "branches_ffn_causal.png", "tuned_lens.safetensors"):
        assert (out / name).stat().st_size > 0, name
    (out / "metrics" / "tuned_lens.json").unlink()  # a rerun recomputes it from the cached translators
    results_path = out / "results.json"
    data = json.loads(results_path.read_text())
    del data["metrics"]["tuned_lens"]
    results_path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert json.loads(results_path.read_text())["metrics"]["tuned_lens"]["reused"]
