"""Metrics (acc, acc_norm, standard errors, macro average), the results layout, and writing results."""

import json
import math

import pytest

from depthlab.errors import EvalError
from depthlab.eval import evaluate, format_table, runner, save_results
from depthlab.eval.scorer import Score


def fake_scorer(logprobs):
    """A stand-in for the model: hands out the given log-likelihoods in request order, across calls."""
    queue = list(logprobs)

    def score(model, tokenizer, requests, **kwargs):
        taken = [queue.pop(0) for _ in requests]
        return [Score(lp, 1, False) for lp in taken]
    return score


def test_acc_and_acc_norm_definitions(monkeypatch, llama, tokenizer):
    # arc_easy #0: choices "cellular telephone" (18 chars, gold), "television" (10), "refrigerator" (12),
    # "airplane" (8). Raw log-likelihood prefers "television"; per character, the gold answer wins.
    monkeypatch.setattr(runner, "loglikelihoods", fake_scorer([-17.0, -11.0, -20.0, -16.0]))
    r = evaluate(llama, tokenizer, "arc_easy", limit=1)["results"]["arc_easy"]
    assert r["acc,none"] == 0.0 and r["acc_norm,none"] == 1.0
    assert r["acc_stderr,none"] is None  # one example: no standard error


def test_stderr_and_macro_average(monkeypatch, llama, tokenizer):
    # copa's first 4 examples have gold 1, 1, 0, 1; make the model pick choice 0 every time: 1 of 4 right.
    monkeypatch.setattr(runner, "loglikelihoods", fake_scorer([-1.0, -2.0] * 4))
    copa = evaluate(llama, tokenizer, "copa", limit=4)["results"]["copa"]
    p, n = 0.25, 4
    assert copa["acc,none"] == p
    assert copa["acc_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # sample std / sqrt(n)

    monkeypatch.setattr(runner, "loglikelihoods", fake_scorer([-1.0, -2.0] * 4 + [-2.0, -1.0] * 4))
    out = evaluate(llama, tokenizer, ["copa", "piqa"], limit=4)
    piqa = out["results"]["piqa"]
    average = out["groups"]["average"]
    assert average["acc,none"] == pytest.approx((copa["acc,none"] + piqa["acc,none"]) / 2)
    assert average["acc_stderr,none"] == pytest.approx(
        math.hypot(copa["acc_stderr,none"], piqa["acc_stderr,none"]) / 2)


def test_results_layout_and_files(llama, tokenizer, tmp_path):
    out = evaluate(llama, tokenizer, "copa,winogrande", limit=3, log_samples=True, batch_size=4)
    assert set(out) >= {"results", "groups", "n-samples", "config", "depthlab_version", "samples"}
    for task in ("copa", "winogrande"):
        r = out["results"][task]
        assert set(r) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
        assert out["n-samples"][task]["effective"] == 3
        for s in out["samples"][task]:
            best = max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__)
            assert s["acc"] == int(best == s["target"])
    assert out["n-samples"]["copa"]["original"] == 100
    assert out["config"]["limit"] == 3 and len(out["config"]["weights_sha256"]) == 64

    path = save_results(out, tmp_path / "res")
    written = json.loads(path.read_text())
    assert "samples" not in written and written["results"] == out["results"]
    lines = (tmp_path / "res" / "samples_copa.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == out["samples"]["copa"]
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["results.json", "samples_copa.jsonl",
                                                                    "samples_winogrande.jsonl"]
    table = format_table(out)
    assert "copa" in table and "average" in table


def test_bad_inputs(llama, tokenizer):
    with pytest.raises(EvalError, match="no tokenizer"):
        evaluate(llama, None, "copa")
    with pytest.raises(EvalError, match="positive"):
        evaluate(llama, tokenizer, "copa", limit=0)
    with pytest.raises(EvalError, match="unknown task"):
        evaluate(llama, tokenizer, "copa,nope")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate(llama, tokenizer, None)
