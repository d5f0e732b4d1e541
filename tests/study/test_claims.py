"""Claims, intervals, verdicts and baselines against hand-computed values; the combined claims table."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import yaml

from depthlab.cli import main
from depthlab.study import claims
from depthlab.study.baselines import cross_entropies, validation_pairs
from depthlab.study.report import aggregate, usefulness_reliable, write_reports
from tests.study.conftest import make_run


def test_intervals_match_textbook_formulas():
    mean, half = claims.mean_interval([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and half == pytest.approx(4.302653 * statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert claims.mean_interval([5.0]) == (5.0, None)
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    effect, half = claims.welch(a, b)
    va, vb = 1.0 / 3, statistics.variance(b) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert effect == pytest.approx(5.0) and half == pytest.approx(claims.t_quantile(df) * math.sqrt(va + vb))
    assert claims.welch([1.0], [2.0, 3.0]) == (1.5, None)
    xs, ys = [1.0, 2.0, 3.0, 4.0], [2.1, 3.9, 6.2, 7.8]
    slope, half = claims.slope(xs, ys)
    fit = np.polyfit(xs, ys, 1)
    residual = np.sum((np.polyval(fit, xs) - ys) ** 2)
    assert slope == pytest.approx(fit[0])
    assert half == pytest.approx(claims.t_quantile(2) * math.sqrt(residual / 2 / 5.0))


@pytest.mark.parametrize(("effect", "half", "direction", "unreliable", "expected"), [
    (0.5, 0.2, +1, 0, "reproduced"), (-0.5, 0.2, +1, 0, "not reproduced"), (0.1, 0.2, +1, 0, "inconclusive"),
    (-0.5, 0.2, -1, 0, "reproduced"), (0.5, None, +1, 0, "inconclusive"), (0.5, 0.2, +1, 1, "inconclusive"),
    (None, None, +1, 0, "inconclusive")])
def test_verdict_rule(effect, half, direction, unreliable, expected):
    assert claims.verdict(effect, half, direction, unreliable)[0] == expected


def _run(n_layers, seed, *, wd=0.1, label=None, **values):
    return {"state": "done", "label": label or f"L{n_layers}", "seed": seed, "values": values,
            "reliable": {"usefulness": values.pop("reliable", True)},
            "config": {"model": {"n_layers": n_layers, "n_heads": 4, "n_kv_heads": 0, "seq_len": 128},
                       "optimizer": {"weight_decay": wd}}}


def test_depth_claims_trend_per_doubling():
    runs = [_run(L, s, last_var=L * (1 + 0.05 * s), usefulness=1.0 - 0.1 * math.log2(L) + 0.01 * s,
                 continuous_usefulness=0.05 + 0.001 * (L + s))
            for L in (2, 4, 8) for s in range(3)]
    results = {r["claim"]: r for r in claims.evaluate_study("depth", runs)}
    twin = results["usefulness falls with depth (threshold-free: mean log loss ratio)"]
    assert twin["verdict"] == "not reproduced" and twin["effect"] > 0  # it rises here: the opposite sign
    assert claims.format_paper(twin, "L") == "↓"  # the paper has no threshold-free numbers
    var = results["last-layer variance grows with depth"]
    assert var["effect"] == pytest.approx(math.log(2)) and var["n"] == 9 and var["verdict"] == "reproduced"
    assert claims.format_result(var, "L").startswith("×2 [") and "per doubling of L (n=9)" in claims.format_result(
        var, "L")
    useful = results["usefulness falls with depth"]
    assert useful["effect"] == pytest.approx(-0.1) and useful["verdict"] == "reproduced"
    assert claims.format_paper(useful, "L") == "↓ (paper at L 12 → 32: 1 → 0.562)"  # tiny L are not paper rows
    assert results["the causal effect of a block falls with depth"]["verdict"] == "inconclusive"  # no causal values
    runs[0]["reliable"]["usefulness"] = False
    again = {r["claim"]: r for r in claims.evaluate_study("depth", runs)}["usefulness falls with depth"]
    assert again["verdict"] == "inconclusive" and "under-determined" in again["why"]


def test_weight_decay_contrasts_show_the_papers_numbers_when_settings_match():
    runs = [_run(4, s, wd=wd, label=f"wd{wd:g}", usefulness=u + 0.01 * s, ppl=p * (1 + 0.01 * s))
            for wd, u, p in ((0.0, 0.5, 100.0), (0.1, 0.6, 90.0), (1.0, 0.4, 95.0)) for s in range(2)]
    results = {r["claim"]: r for r in claims.evaluate_study("weight_decay", runs)}
    up = results["moderate weight decay (λ 0 → 0.1) raises usefulness"]
    assert up["settings"] == (0.0, 0.1) and up["effect"] == pytest.approx(0.1)
    assert up["half"] == pytest.approx(claims.welch([0.5, 0.51], [0.6, 0.61])[1]) and up["verdict"] == "reproduced"
    assert claims.format_paper(up, "λ") == "0.75 → 0.81 ↑"  # λ 0 and 0.1 are the paper's rows
    down = results["too much weight decay (λ 0.1 → max) lowers usefulness"]
    assert down["settings"] == (0.1, 1.0) and down["effect"] == pytest.approx(-0.2)
    assert claims.format_paper(down, "λ") == "↓ (paper at λ 0.1 → 3: 0.81 → 0.63)"  # the study's max is 1
    ppl = results["moderate weight decay (λ 0 → 0.1) lowers PPL"]
    assert ppl["effect"] == pytest.approx(math.log(0.9)) and ppl["log"]
    assert results["weight decay (λ 0 → max) lowers last-layer variance"]["effect"] is None  # no variance logged


def test_a_metric_without_variation_says_so_instead_of_a_noisy_null():
    runs = [_run(4, s, wd=wd, label=f"wd{wd:g}", usefulness=0.0, continuous_usefulness=0.01 * (s + wd))
            for wd in (0.0, 0.1, 3.0) for s in range(3)]
    results = {r["claim"]: r for r in claims.evaluate_study("weight_decay", runs)}
    flat = results["moderate weight decay (λ 0 → 0.1) raises usefulness"]
    assert flat["verdict"] == "inconclusive" and flat["why"] == (
        "usefulness is 0 in every run: no block passes the threshold")
    noisy = results["moderate weight decay (λ 0 → 0.1) raises usefulness (threshold-free: mean log loss ratio)"]
    assert noisy["why"] == "the 95% interval includes 0"


def test_usefulness_reliability_from_the_flag_or_the_fit_size():
    assert usefulness_reliable({"metrics": {"usefulness": {"score": 0.5, "reliable": False}}}) is False
    old = {"metrics": {"usefulness": {"score": 0.5}}, "model": {"d_model": 64},
           "settings": {"num_samples": 8, "seq_len": 64}}
    assert usefulness_reliable(old) is False  # 512 same-sample tokens < 10·65
    old["settings"]["num_samples"] = 11
    assert usefulness_reliable(old) is True
    assert usefulness_reliable({"metrics": {}}) is True


def test_baselines_equal_brute_force_counts():
    rng = np.random.default_rng(0)
    V = 7
    train = rng.integers(0, V, 500)
    val = rng.integers(0, V, 41)
    prev, target = validation_pairs(val, seq_len=8, n_windows=4)
    assert np.array_equal(prev, val[:32]) and np.array_equal(target, val[1:33])
    uni = [-math.log((np.sum(train == b) + 1) / (len(train) + V)) for b in target]
    bi = [-math.log((np.sum((train[:-1] == a) & (train[1:] == b)) + 1) / (np.sum(train[:-1] == a) + V))
          for a, b in zip(prev, target)]
    ce = cross_entropies(train, prev, target, V)
    assert ce["unigram"] == pytest.approx(np.mean(uni)) and ce["bigram"] == pytest.approx(np.mean(bi))
    assert validation_pairs(val, seq_len=8, n_windows=99)[1].shape == (40,)  # capped at the split's windows


def _depth_study(root, *, reliable=True, val_loss=None, steps=(10, 20)):
    root.mkdir()
    (root / "study.yaml").write_text(yaml.safe_dump({"name": "depth", "scale": "tiny", "reference": "depth",
                                                     "seeds": [0, 1], "knobs": ["model.n_layers"],
                                                     "measure": {"analysis": ["usefulness"], "analysis_samples": 4,
                                                                 "analysis_seq_len": 32}}))
    for L in (2, 4):
        for seed in (0, 1):
            run = make_run(root, f"L{L}__s{seed}", label=f"L{L}", n_layers=L, seed=seed, val_ppl=math.exp(4.0),
                           out_var=[[1.0] * L, [1.0] * (L - 1) + [L * (1.0 + 0.1 * seed)]], usefulness=1 / L,
                           causal=0.3, permutation=0.2)
            info = json.loads((run / "run.json").read_text())
            info["config"]["trainer"]["max_steps"] = steps[-1]
            (run / "run.json").write_text(json.dumps(info))
            results = json.loads((run / "analysis" / "results.json").read_text())
            results["metrics"]["usefulness"].update(reliable=reliable, continuous_score=0.1 * L)
            (run / "analysis" / "results.json").write_text(json.dumps(results))
            early = run / "dynamics" / f"step_{steps[0]:06d}"
            early.mkdir(parents=True)
            (early / "results.json").write_text(json.dumps({"metrics": {"usefulness": {
                "score": 0.0, "continuous_score": 0.01 * L + 0.001 * seed, "reliable": True}}}))
            (run / "baselines.json").write_text(json.dumps({"unigram": 6.0, "bigram": val_loss or 5.0}))
            (run / "done.json").write_text(json.dumps({"seconds": 60.0, "load_average": {
                "start": [1.0, 1.5, 2.0], "end": [2.0, 2.5, 3.0]}}))
    return root


def test_report_marks_unreliable_and_below_bigram_and_plots_dynamics(tmp_path):
    study = _depth_study(tmp_path / "depth-tiny", reliable=False, val_loss=3.9)
    agg = aggregate(study)
    rows = {r["label"]: r for r in agg["rows"]}
    assert rows["L2"]["unreliable"] == 2 and rows["L2"]["below_bigram"] == 2
    assert [[p["step"] for p in d] for d in rows["L4"]["dynamics"]] == [[10, 20], [10, 20]]
    assert rows["L4"]["dynamics"][1][0]["continuous_usefulness"] == pytest.approx(0.041)
    assert agg["context"] == "d=64, T=128, 20 steps, analysis 4×32 tokens, 2 seeds"
    written = write_reports([study], tmp_path / "out")
    md = written[1].read_text().replace("\\", "")  # compared with Markdown escapes removed
    assert "0.500 ± 0.000 †" in md and "4.000 ± 0.000 ‡" in md and "NO ‡" in md
    assert "| usefulness falls with depth | L 2 → 4 |" in md and "under-determined fit" in md
    assert "| L2__s0 | done | 4.000 | 3.900 | NO ‡ | 60 | 1.00 → 2.00 |" in md
    assert (tmp_path / "out" / "figures" / "usefulness_vs_step.png").exists()


def test_combined_table_links_only_written_reports(tmp_path, capsys):
    a = _depth_study(tmp_path / "depth-tiny")
    b = tmp_path / "free"
    b.mkdir()
    (b / "study.yaml").write_text(yaml.safe_dump({"name": "free", "seeds": [0], "knobs": []}))
    readme = tmp_path / "results" / "README.md"
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "results"), "--combined", str(readme)]) == 0
    assert f"wrote {readme}" in capsys.readouterr().out
    text = readme.read_text()
    assert "| [depth (tiny scale)](depth-tiny/report.md) | last-layer variance grows with depth | L 2 → 4 |" in text
    assert "| [free](free/report.md) | (no claims: the study has no paper reference) |" in text
    assert "4 min over 4 runs, 5-min load 2.5–2.5" in text and claims.RULE in text
    for target in [line.split("](")[1].split(")")[0] for line in text.splitlines() if "](" in line]:
        assert (readme.parent / target).exists(), target  # cites only files that exist
    assert (tmp_path / "results" / "depth-tiny" / "report.html").exists()


def test_report_names_the_study_folder_instead_of_citing_its_path(tmp_path):
    study = _depth_study(tmp_path / "depth-tiny")
    failed = make_run(study, "L8__s0", label="L8", n_layers=8, seed=0, val_ppl=50.0, out_var=[[1.0] * 8],
                      state="failed")
    (failed / "failed.json").write_text(json.dumps({"error": f"AnalysisError: saved in {failed / 'analysis'}"}))
    md = write_reports([study], tmp_path / "out")[1].read_text().replace("\\", "")
    assert "AnalysisError: saved in STUDY/runs/L8__s0/analysis" in md and str(tmp_path) not in md
