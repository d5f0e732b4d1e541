"""Analysis API errors: bad token ids, unknown metrics, non-causal models and unlocatable blocks are AnalysisErrors."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from depthlab.analysis import analyze, usefulness
from depthlab.errors import AnalysisError

from .conftest import build


def test_api_bad_inputs(ids):
    model = build("llama")
    with pytest.raises(AnalysisError, match="vocabulary"):
        usefulness(model, torch.full((2, 4), 64))
    with pytest.raises(AnalysisError, match="at least 2 tokens"):
        usefulness(model, ids[:, :1])
    with pytest.raises(AnalysisError, match="unknown metric"):
        analyze(model, ids, ["variance", "bogus"])
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(AnalysisError, match="not a causal language model"):
        usefulness(bert, ids)
    del model.model.layers
    with pytest.raises(AnalysisError, match="cannot locate the transformer blocks"):
        usefulness(model, ids)
