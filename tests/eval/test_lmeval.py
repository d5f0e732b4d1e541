"""The lm-eval bridge: lm-eval's own scoring of the same model and data agrees with depthlab's, example by example."""

import pytest
import torch

from depthlab.config import ModelConfig
from depthlab.errors import EvalError
from depthlab.eval import evaluate
from depthlab.model.transformer import Transformer

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


def test_needs_a_hugging_face_model(tokenizer):
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2, seq_len=32))
    with pytest.raises(EvalError, match="export"):
        evaluate_lmeval(model, tokenizer, "copa", limit=1)
    with torch.no_grad():
        assert evaluate(model, tokenizer, "copa", limit=1)["results"]["copa"]["acc,none"] in (0.0, 1.0)
