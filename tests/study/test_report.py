"""Aggregation, report and comparison against hand-built run folders (every value known in advance)."""

from __future__ import annotations

import base64
import json
import re
import statistics

import pytest

from depthlab.cli import main
from depthlab.study.compare import compare_runs, format_comparison
from depthlab.study.report import aggregate, table, write_report
from tests.study.conftest import EVIL


def test_aggregate_means_seeds_and_matches_paper_rows(study):
    agg = aggregate(study)
    assert [r["name"] for r in agg["runs"]] == ["L12__s0", "L12__s1", EVIL, "L16"]
    assert [r["state"] for r in agg["runs"]] == ["done", "done", "done", "failed"]
    rows = {r["label"]: r for r in agg["rows"]}
    assert set(rows) == {"L12", EVIL}  # the failed run is not in the table
    m = rows["L12"]["metrics"]
    assert m["ppl"]["mean"] == pytest.approx(21.0) and m["ppl"]["std"] == pytest.approx(statistics.stdev([20, 22]))
    assert m["ppl"]["half"] == pytest.approx(12.706205 * 1.0)  # t(0.975, 1) · s / √2 with s = √2
    assert m["usefulness"]["mean"] == pytest.approx(0.625)
    assert m["usefulness"]["std"] == pytest.approx(statistics.stdev([0.5, 0.75]))
    assert m["causal"]["mean"] == pytest.approx(0.32) and m["permutation"]["mean"] == pytest.approx(0.25)
    assert m["avg_acc"]["mean"] == pytest.approx(42.0)
    assert m["last_var"]["mean"] == pytest.approx(9.0) and m["last_var"]["n"] == 2
    assert rows["L12"]["var_curves"] == [[1.0, 8.0], [1.0, 10.0]] and rows["L12"]["var_steps"] == [10, 20]
    assert rows["L12"]["paper"] == {"causal": 0.355, "permutation": 0.985, "usefulness": 1.0, "last_var": 400}
    evil = rows[EVIL]["metrics"]
    assert evil["ppl"] == {"mean": 50.0, "std": None, "half": None, "n": 1}  # no eval: the training run's val PPL
    assert "usefulness" not in evil and rows[EVIL]["paper"] == {}  # L=3 is no paper row
    header, body = table(agg)
    assert header[:5] == ["setting", "seeds", "val loss", "PPL", "usefulness"] and "paper usefulness" in header
    assert body[0][:5] == ["L12", "2", "3.433 ± 0.410", "21.00 ± 12.71", "0.625 ± 1.588"]
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
             "ppl_usefulness_vs_model_n_layers", "accuracy_bars"]  # one analysed checkpoint: no dynamics figure
    assert len(images) == len(stems) and f'data-figures-expected="{len(stems)}"' in page
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.stem for p in (tmp_path / "out" / "figures").iterdir()) == sorted(stems)
    md = md_path.read_text()
    assert "| L12 | 2 | 3.433 ± 0.410 | 21.00 ± 12.71 | 0.625 ± 1.588 |" in md and "![" in md
    assert "| L16 | failed | 2.197 | — | — | — | — | TrainingError" in md
    assert md.index("## Claims") < md.index("## Results")  # the claims table opens the report


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


def _reanalysis(run, name, *, usefulness, num_samples, seq_len, model_seq_len=None):
    """A re-analysis folder RUN/NAME as `depthlab analyze RUN --out RUN/NAME` writes it (the fields the report
    reads), optionally with the run trained at another context length."""
    (run / name).mkdir()
    (run / name / "results.json").write_text(json.dumps({
        "metrics": {"usefulness": {"score": usefulness}, "causal": {"mean_effect": 0.9}},
        "settings": {"num_samples": num_samples, "seq_len": seq_len}}))
    if model_seq_len is not None:
        info = json.loads((run / "run.json").read_text())
        info["config"]["model"]["seq_len"] = model_seq_len
        (run / "run.json").write_text(json.dumps(info))


def test_report_reads_another_analysis_folder(study, tmp_path):
    runs = study / "runs"
    _reanalysis(runs / "L12__s0", "own", usefulness=0.25, num_samples=64, seq_len=32, model_seq_len=32)
    _reanalysis(runs / "L12__s1", "own", usefulness=0.0, num_samples=8, seq_len=256, model_seq_len=256)
    default, other = aggregate(study), aggregate(study, analysis="own")
    assert {r["label"]: r for r in default["rows"]}["L12"]["metrics"]["usefulness"]["mean"] == pytest.approx(0.625)
    row = {r["label"]: r for r in other["rows"]}["L12"]
    assert row["metrics"]["usefulness"]["mean"] == pytest.approx(0.125)
    assert row["metrics"]["causal"]["mean"] == pytest.approx(0.9)
    assert "usefulness" not in {r["label"]: r for r in other["rows"]}[EVIL]["metrics"]  # no re-analysis there
    assert all(run["dynamics"] == [] for run in other["runs"])  # the study's checkpoints used the study's sample
    assert other["context"].endswith("analysis at each run's own T, 2048 tokens per run, 2 seeds")
    _, md_path = write_report(study, tmp_path / "own", analysis="own")
    md = md_path.read_text()
    assert md.startswith("# depthlab study: hand, analysis from own/")
    assert "read from each run's own/ folder" in md and "| L12 | 2 |" in md


def test_context_names_one_shared_analysis_sample(study):
    for name in ("L12__s0", "L12__s1"):
        _reanalysis(study / "runs" / name, "short", usefulness=0.5, num_samples=16, seq_len=64)
    assert aggregate(study, analysis="short")["context"].endswith("analysis 16×64 tokens, 2 seeds")


def test_report_cli_rejects_a_missing_or_unsafe_analysis_folder(study, capsys):
    assert main(["report", str(study), "--analysis", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "no run of" in err and "nothing/results.json" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(study), "--analysis", "../x"]) == 2
    assert "must be the name of a folder" in capsys.readouterr().err
    _reanalysis(study / "runs" / "L12__s0", "own", usefulness=0.25, num_samples=4, seq_len=32)
    assert main(["report", str(study), "--analysis", "own"]) == 0
    assert "analysis from own/" in (study / "report" / "report.md").read_text()
