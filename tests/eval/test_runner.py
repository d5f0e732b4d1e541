"""Metrics (acc, acc_norm, exact_match, standard errors, macro average), lm-eval's results layout, writing results."""

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
    assert r["acc_stderr,none"] == "N/A"  # one example: no standard error (lm-eval's spelling)


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
    for task in ("copa", "winogrande"):
        r = out["results"][task]
        assert set(r) == {"name", "alias", "sample_len", "acc,none", "acc_stderr,none", "acc_norm,none",
                          "acc_norm_stderr,none"}
        assert r["alias"] == f"{task} (validation)" and out["configs"][task]["validation_split"] == "validation"
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


def test_exact_match_and_average_over_metric_kinds(monkeypatch, llama, tokenizer):
    """A generative task reports exact_match under lm-eval's filter name; the average has each metric over the
    tasks reporting it."""
    from depthlab.eval.tasks import load_examples

    questions = load_examples("basic_arithmetic", 4)
    answers = [q.answers[0] for q in questions]  # e.g. "96" for "Calculate 5 + 91 ="
    generations = [f" {answers[0]}", answers[1] + "0", f"{answers[2]}  ", "no"]  # right, wrong, right, wrong
    monkeypatch.setattr(runner, "generate_until", lambda model, tok, prompts, **kw: generations[:len(prompts)])
    monkeypatch.setattr(runner, "loglikelihoods", fake_scorer([-1.0, -2.0] * 4))
    out = evaluate(llama, tokenizer, "basic_arithmetic,copa", limit=4)
    em = out["results"]["basic_arithmetic"]
    assert em["exact_match,remove_whitespace"] == 0.5
    assert em["exact_match_stderr,remove_whitespace"] == pytest.approx(math.sqrt(0.25 * 4 / 3 / 4))
    average = out["groups"]["average"]
    assert average["exact_match,remove_whitespace"] == 0.5 and average["acc,none"] == 0.25
    assert out["higher_is_better"]["basic_arithmetic"] == {"exact_match": True}


LMEVAL_KEYS = {"results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
               "n-samples", "config", "git_hash", "date", "pretty_env_info", "transformers_version",
               "lm_eval_version", "upper_git_hash", "tokenizer_pad_token", "tokenizer_eos_token",
               "tokenizer_bos_token", "eot_token_id", "max_length", "task_hashes", "model_source", "model_name",
               "model_name_sanitized", "system_instruction", "system_instruction_sha", "fewshot_as_multiturn",
               "chat_template", "chat_template_sha", "total_evaluation_time_seconds"}


def test_every_lm_eval_top_level_key_and_make_table(monkeypatch, llama, tokenizer, tmp_path):
    """The top-level keys of lm-eval 0.4's results file (simple_evaluate's and its tracker's), and its own table
    renderer reads the written file, one row per task and metric, naming the scored split."""
    monkeypatch.setattr(runner, "loglikelihoods", fake_scorer([-1.0, -2.0] * 3 + [-2.0, -1.0, -3.0, -4.0] * 3))
    out = evaluate(llama, tokenizer, "copa,arc_easy", limit=3, num_fewshot=1)
    assert LMEVAL_KEYS <= set(out)
    assert out["n-shot"] == {"arc_easy": 1, "average": 1, "copa": 1}
    assert out["group_subtasks"] == {"average": ["copa", "arc_easy"]} and "average" in out["results"]
    assert out["configs"]["arc_easy"]["metadata"]["lm_eval_task_split"] == "test"  # lm-eval's arc_easy scores test
    assert isinstance(out["date"], float) and out["config"]["fewshot_seed"] == 1234

    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    written = json.loads(save_results(out, tmp_path).read_text())
    table = lm_eval_utils.make_table(written)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    names = [r[0].strip() for r in rows if r[0].strip()]
    assert names == ["average (macro over tasks)", "- arc_easy (validation)", "- copa (validation)"]
    assert [(r[3].strip(), r[4].strip(), r[6].strip()) for r in rows[2:4]] == [("1", "acc", "0.0000"),
                                                                              ("1", "acc_norm", "0.0000")]
    assert "average" in lm_eval_utils.make_table(written, "groups")
