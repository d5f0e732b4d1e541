"""The lm-eval bridge: lm-eval's own scoring of the same model and data agrees with depthlab's, example by example,
zero-shot and few-shot, for log-likelihoods and for greedy generations."""

import pytest
import torch

from depthlab.config import ModelConfig
from depthlab.errors import EvalError
from depthlab.eval import evaluate
from depthlab.model.transformer import Transformer

from .conftest import tiny_llama

pytest.importorskip("lm_eval")

from depthlab.eval.lmeval import evaluate_lmeval

TASKS = ["piqa", "winogrande", "copa", "mmlu", "boolq", "sciq"]


def test_same_log_likelihoods_and_decisions_as_lm_eval(llama, tokenizer):
    ours = evaluate(llama, tokenizer, TASKS, limit=3, log_samples=True)
    theirs = evaluate_lmeval(llama, tokenizer, TASKS, limit=3, log_samples=True, batch_size=4)
    for task in TASKS:
        for mine, ref in zip(ours["samples"][task], sorted(theirs["samples"][task], key=lambda s: s["doc_id"])):
            assert mine["arguments"] == [list(a) for a in ref["arguments"]]
            assert mine["loglikelihoods"] == pytest.approx([r[0] for r in ref["filtered_resps"]], abs=1e-3)
            assert mine["acc"] == ref["acc"], task
            if task != "winogrande":  # lm-eval divides winogrande's shared continuation by each *context's* length
                assert mine["acc_norm"] == ref["acc_norm"], task
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert theirs["groups"]["average"]["acc,none"] == pytest.approx(ours["groups"]["average"]["acc,none"])


def test_few_shot_and_generative_agree_with_lm_eval(tokenizer):
    """2-shot MMLU (dev shots, two subjects), Winogrande and COPA (seeded shots from the split) and the generative
    tasks: same prompts, log-likelihoods, decisions and generations as lm-eval's HFLM."""
    model = tiny_llama(len(tokenizer), max_positions=1024)  # room for 256 generated tokens after a 2-shot prompt
    tasks = ["mmlu", "winogrande", "copa", "nq_open", "basic_arithmetic"]
    kwargs = {"num_fewshot": 2, "log_samples": True, "batch_size": 3}
    ours = {t: evaluate(model, tokenizer, t, limit=13 if t == "mmlu" else 3, **kwargs) for t in tasks}
    theirs = {t: evaluate_lmeval(model, tokenizer, t, limit=13 if t == "mmlu" else 3, **kwargs) for t in tasks}
    for task in tasks:
        mine_all, ref_all = ours[task]["samples"][task], sorted(theirs[task]["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine_all) == len(ref_all) > 0
        for mine, ref in zip(mine_all, ref_all):
            assert mine["doc_id"] == ref["doc_id"]
            if "generation" in mine:
                assert mine["arguments"] == [ref["arguments"][0][0]] and mine["arguments"][0].count("\n") >= 4
                assert mine["generation"].strip() == ref["filtered_resps"][0], task
                assert mine["exact_match"] == ref["exact_match"], task
            else:
                assert mine["arguments"] == [list(a) for a in ref["arguments"]]
                assert mine["loglikelihoods"] == pytest.approx([r[0] for r in ref["filtered_resps"]], abs=1e-3)
                assert mine["acc"] == ref["acc"], task
        key = "exact_match,remove_whitespace" if task in ("nq_open", "basic_arithmetic") else "acc,none"
        assert ours[task]["results"][task][key] == pytest.approx(theirs[task]["results"][task][key])


def test_exact_match_normalisation_is_lm_evals():
    """nq_open's exact match (regexes, case, punctuation, any of several answers) decides as lm-eval's does."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from depthlab.eval.tasks import TASKS

    metric = TASKS["nq_open"].generation.metric
    options = {"regexes_to_ignore": list(metric.regexes_to_ignore), "ignore_case": True, "ignore_punctuation": True}
    answers = ("The Beatles", "14 December 1972 UTC", "U.S.", "an apple")
    for guess in ["the beatles", "Beatles!", " THE BEATLES ", "Beatles band", "14 december 1972 utc.", "US",
                  "U.S", "apple", "An Apple", "a apple", "theBeatles", "1972", "", "Beatles, the"]:
        ref = any(exact_match_hf_evaluate([guess.strip()], [a], **options)["exact_match"] for a in answers)
        assert metric(guess, answers) == ref, guess


def test_needs_a_hugging_face_model(tokenizer):
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2, seq_len=32))
    with pytest.raises(EvalError, match="export"):
        evaluate_lmeval(model, tokenizer, "copa", limit=1)
    with torch.no_grad():
        assert evaluate(model, tokenizer, "copa", limit=1)["results"]["copa"]["acc,none"] in (0.0, 1.0)
