"""`weight_sparsity`, `attention_sparsity` and `moe_stats` on models of other families: the rows cover what they
should, the SDPA observation equals explicit attention weights, and undefined values are reported as such."""

from __future__ import annotations

import math

import pytest
import torch

from depthlab import measures
from depthlab.analysis.moe import moe_stats
from depthlab.analysis.sparsity import attention_sparsity, weight_sparsity
from depthlab.config import ModelConfig, MoEConfig
from depthlab.model.transformer import Transformer
from depthlab.model.view import ModelView
from tests.analysis.conftest import build


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GQA under SDPA; GPT-2's Conv1D matrices
def test_attention_sparsity_equals_the_eager_attention_weights(family, ids):
    model = build(family)
    got = attention_sparsity(model, ids, micro_batch_size=3)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions  # per layer [B, H, T, T]
    for l, probs in enumerate(weights):
        ref = measures.attention_means(measures.attention_sums(probs))
        assert got.entropy[l] == pytest.approx(ref["entropy"].tolist(), rel=1e-5)
        assert got.normalized_entropy[l] == pytest.approx(ref["normalized_entropy"].tolist(), rel=1e-5)
        assert got.effective_support[l] == pytest.approx(ref["effective_support"].tolist(), rel=1e-5)
        assert got.top8_mass[l] == pytest.approx(ref["top8_mass"].tolist(), rel=1e-5)
        assert got.layer_entropy[l] == pytest.approx(ref["entropy"].mean().item(), rel=1e-5)


def test_weight_sparsity_rows_cover_every_matrix_of_every_block():
    model = build("gpt2")
    got = weight_sparsity(model)
    blocks = ModelView(model).blocks
    expected = [(l, name) for l, b in enumerate(blocks) for name, p in b.named_parameters() if p.ndim >= 2]
    assert [(r["layer"], r["matrix"] + ".weight") for r in got.matrices] == expected
    assert got.histogram_edges == measures.histogram_edges()
    for l in range(len(blocks)):
        rows = [r for r in got.matrices if r["layer"] == l]
        mean = sum(r["hoyer"] * r["size"] for r in rows) / sum(r["size"] for r in rows)
        assert got.per_layer_hoyer[l] == pytest.approx(mean)
        for r in rows:
            assert sum(r["histogram"]) == pytest.approx(1.0)
            assert r["frac_below_rel_0.001"] <= r["frac_below_rel_0.01"]


def test_undefined_values_are_null_not_numbers():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, seq_len=8,
                                    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8))).eval()
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.zero_()
    ids = torch.randint(0, 40, (2, 8))
    moe = moe_stats(model, ids).to_dict()
    assert moe["diversity"] is None  # a single MoE layer: there is no pair of layers to compare
    assert sum(moe["load"][0]) == pytest.approx(1.0)
    rows = {r["matrix"]: r for r in weight_sparsity(model).to_dict()["matrices"]}
    assert rows["attn.wq"]["hoyer"] is None and not math.isnan(rows["attn.wk"]["hoyer"])
