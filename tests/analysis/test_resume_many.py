"""`Engine.resume_many` stacks the interventions of one micro-batch into shared block calls: same numbers as one call
per intervention (``resume_tokens=0``), fewer calls, and one call per run where the call arguments cannot be stacked."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from depthlab.analysis import causal_effects, permutation_scores, usefulness
from depthlab.analysis.engine import Engine
from depthlab.model.view import ModelView

from .conftest import V, build


def _model(family: str):
    if family != "bloom":
        return build(family)
    torch.manual_seed(0)  # ALiBi arrives as one [B·heads, 1, T] tensor: not stackable along the batch
    return T.AutoModelForCausalLM.from_config(
        T.BloomConfig(vocab_size=V, hidden_size=16, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0),
        attn_implementation="eager").eval()


def _metrics(model, ids, resume_tokens: int) -> tuple[list, int]:
    """(causal matrix, adjacent and all permutation scores, usefulness ratios), and the calls of the last block."""
    calls = [0]
    handle = ModelView(model).blocks[-1].register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        eng = Engine(model, ids, micro_batch_size=2, resume_tokens=resume_tokens)
        out = [causal_effects(model, ids, engine=eng).matrix,
               permutation_scores(model, ids, pairs="all", engine=eng).scores,
               usefulness(model, ids, bootstrap=0, engine=eng).loss_ratios]
    finally:
        handle.remove()
    return out, calls[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "depthlab", "bloom"])
def test_stacked_interventions_equal_one_call_per_intervention(family, ids):
    model = _model(family)
    alone, alone_calls = _metrics(model, ids, resume_tokens=0)
    stacked, stacked_calls = _metrics(model, ids, resume_tokens=1 << 20)
    for a, b in zip(alone, stacked):
        x = torch.tensor(a, dtype=torch.float64).nan_to_num()
        y = torch.tensor(b, dtype=torch.float64).nan_to_num()
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), family
    if family == "bloom":
        assert stacked_calls == alone_calls
    else:
        assert stacked_calls < alone_calls
