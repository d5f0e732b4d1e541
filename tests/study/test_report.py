"""Aggregation, report and comparison against hand-built run folders (every value known in advance)."""

from __future__ import annotations

import base64
import json
import math
import re
import statistics

import pytest
import yaml

from depthlab.cli import main
from depthlab.study.compare import compare_runs, format_comparison
from depthlab.study.report import aggregate, table, write_report

EVIL = '<img src=x onerror="alert(1)">&'


def make_run(study, name, *, label, n_layers, seed, val_ppl, out_var, usefulness=None, causal=None,
             permutation=None, eval_ppl=None, acc=None, state="done"):
    """A run folder with the files a real run writes; `out_var` is the per-layer variance at each logged step."""
    run = study / "runs" / name
    run.mkdir(parents=True)
    config = {"model": {"n_layers": n_layers, "n_heads": 4, "n_kv_heads": 0, "seq_len": 128, "d_model": 64},
              "optimizer": {"weight_decay": 0.1}, "trainer": {"seed": seed}}
    (run / "run.json").write_text(json.dumps({"name": name, "index": len(list((study / "runs").iterdir())),
                                              "label": label, "setting": {"model.n_layers": n_layers},
                                              "seed": seed, "config": config}))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0}, {"step": 20, "val_loss": math.log(val_ppl),
                                                                    "val_ppl": val_ppl}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 2')  # torn line
    stats = [{"step": 10 * (i + 1), "layers": [{"layer": j, "out_var": v} for j, v in enumerate(profile)]}
             for i, profile in enumerate(out_var)]
    (run / "layer_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stats))
    metrics = {}
    if usefulness is not None:
        metrics["usefulness"] = {"score": usefulness}
        metrics["causal"] = {"mean_effect": causal}
        metrics["permutation"] = {"mean_score": permutation}
        metrics["jacobian"] = {"layers": [{"jacobian_norm": 0.1 * (j + 1)} for j in range(n_layers)]}
        (run / "analysis").mkdir()
        (run / "analysis" / "results.json").write_text(json.dumps({"metrics": metrics, "summary": {
            "usefulness_score": usefulness, "causal_mean_effect": causal}}))
    if eval_ppl is not None or acc is not None:
        results = {"results": {}, "groups": {"average": {"acc,none": acc}} if acc is not None else {}}
        if eval_ppl is not None:
            results["perplexity"] = {"perplexity": eval_ppl}
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps(results))
    if state == "done":
        (run / "done.json").write_text("{}")
    elif state == "failed":
        (run / "failed.json").write_text(json.dumps({"error": "TrainingError: non-finite loss <at> step 3"}))
    return run


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    (root / "study.yaml").write_text(yaml.safe_dump({"name": "hand", "reference": "depth", "seeds": [0, 1],
                                                     "knobs": ["model.n_layers"], "base": None}))
    make_run(root, "L12__s0", label="L12", n_layers=12, seed=0, val_ppl=30.0, out_var=[[1.0] * 12, [2.0] * 11 + [8.0]],
             usefulness=0.5, causal=0.30, permutation=0.20, eval_ppl=20.0, acc=0.40)
    make_run(root, "L12__s1", label="L12", n_layers=12, seed=1, val_ppl=32.0, out_var=[[1.0] * 12, [2.0] * 11 + [10.0]],
             usefulness=0.75, causal=0.34, permutation=0.30, eval_ppl=22.0, acc=0.44)
    make_run(root, EVIL, label=EVIL, n_layers=3, seed=0, val_ppl=50.0, out_var=[[1.0, 2.0, 3.0], [1.5, 3.0, 6.0]])
    make_run(root, "L16", label="L16", n_layers=16, seed=0, val_ppl=9.0, out_var=[[1.0] * 16], state="failed")
    return root


def test_aggregate_means_seeds_and_matches_paper_rows(study):
    agg = aggregate(study)
    assert [r["name"] for r in agg["runs"]] == ["L12__s0", "L12__s1", EVIL, "L16"]
    assert [r["state"] for r in agg["runs"]] == ["done", "done", "done", "failed"]
    rows = {r["label"]: r for r in agg["rows"]}
    assert set(rows) == {"L12", EVIL}  # the failed run is not in the table
    m = rows["L12"]["metrics"]
    assert m["ppl"]["mean"] == pytest.approx(21.0) and m["ppl"]["std"] == pytest.approx(statistics.stdev([20, 22]))
    assert m["usefulness"]["mean"] == pytest.approx(0.625)
    assert m["usefulness"]["std"] == pytest.approx(statistics.stdev([0.5, 0.75]))
    assert m["causal"]["mean"] == pytest.approx(0.32) and m["permutation"]["mean"] == pytest.approx(0.25)
    assert m["avg_acc"]["mean"] == pytest.approx(42.0)
    assert m["last_var"]["mean"] == pytest.approx(9.0) and m["last_var"]["n"] == 2
    assert rows["L12"]["var_curves"] == [[1.0, 8.0], [1.0, 10.0]] and rows["L12"]["var_steps"] == [10, 20]
    assert rows["L12"]["paper"] == {"causal": 0.355, "permutation": 0.985, "usefulness": 1.0, "last_var": 400}
    evil = rows[EVIL]["metrics"]
    assert evil["ppl"] == {"mean": 50.0, "std": None, "n": 1}  # no eval: the training run's val PPL
    assert "usefulness" not in evil and rows[EVIL]["paper"] == {}  # L=3 is no paper row
    header, body = table(agg)
    assert header[:4] == ["setting", "seeds", "PPL", "usefulness"] and "paper usefulness" in header
    assert body[0][:4] == ["L12", "2", "21.00 ± 1.41", "0.625 ± 0.177"]
    assert body[1][header.index("usefulness")] == "—" and body[1][header.index("paper causal")] == "—"


def test_report_is_self_contained_and_escapes_user_strings(study, tmp_path):
    html_path, md_path = write_report(study, tmp_path / "out")
    page = html_path.read_text()
    assert EVIL not in page and html_path.parent == tmp_path / "out"
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in page
    assert "TrainingError: non-finite loss &lt;at&gt; step 3" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    stems = ["variance_vs_step", "variance_profile", "jacobian_profile", "analysis_vs_model_n_layers",
             "ppl_usefulness_vs_model_n_layers", "accuracy_bars"]
    assert len(images) == len(stems) and f'data-figures-expected="{len(stems)}"' in page
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.stem for p in (tmp_path / "out" / "figures").iterdir()) == sorted(stems)
    md = md_path.read_text()
    assert "| L12 | 2 | 21.00 ± 1.41 | 0.625 ± 0.177 |" in md and "![" in md
    assert "| L16 | failed | TrainingError" in md


def test_report_cli_and_errors(study, tmp_path, capsys):
    assert main(["report", str(study)]) == 0
    assert (study / "report" / "report.html").exists() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a study folder" in capsys.readouterr().err


def test_compare_two_runs(study, tmp_path, capsys):
    a, b = study / "runs" / "L12__s0", study / "runs" / EVIL
    c = compare_runs(a, b)
    assert c["config_diff"] == ["model.n_layers: 12 → 3"]
    assert c["final"]["ppl"] == [20.0, 50.0] and c["final"]["usefulness"] == [0.5, None]
    assert c["variance"] == [[2.0] * 11 + [8.0], [1.5, 3.0, 6.0]]
    assert c["analysis"]["usefulness_score"] == [0.5, None]
    text = format_comparison(c)
    assert re.search(r"model\.n_layers\s+12 → 3\n", text) and re.search(r"\n  ppl\s+20\s+50\n", text)
    assert re.search(r"\n  11\s+8\s+—\n", text)  # block 11 exists in A only
    out = tmp_path / "cmp.md"
    assert main(["compare", str(a), str(b), "--markdown", str(out)]) == 0
    assert "| model.n_layers | 12 → 3 |" in out.read_text()
    assert "block" in capsys.readouterr().out
    assert main(["compare", str(a), str(tmp_path)]) == 2
