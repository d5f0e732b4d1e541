"""Per-position metadata stays with the position under every intervention (SPEC §1).

A swap runs block b's *weights* at position a; LayerNorm Scaling's 1/sqrt(l+1), the Mix-LN placement, HF's layer
index and sliding-window type belong to the position. The brute-force reference exchanges the two blocks' state dicts
in a copy of the model and runs it whole.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import transformers as T

from depthlab.analysis import permutation_scores
from depthlab.analysis.engine import Engine
from depthlab.config import ModelConfig
from depthlab.model.transformer import Transformer
from depthlab.model.view import ModelView

from .conftest import V, full_loss, hidden_states, with_blocks, with_weights_swapped


def depthlab_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=32, init_std=0.25, **kw)
    return Transformer(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(1))


def reference_scores(model, ids, pairs):
    base = full_loss(model, ids)
    return [abs(full_loss(with_weights_swapped(model, a, b), ids) - base) / base for a, b in pairs]


@pytest.mark.parametrize("kw", [{"lns": True}, {"lns": True, "norm": "mix", "mix_fraction": 0.5},
                                {"lns": True, "norm": "peri"}, {"norm": "post"}])
def test_permutation_keeps_lns_factor_and_placement_with_the_position(kw, ids):
    model = depthlab_model(**kw)
    got = permutation_scores(model, ids, pairs="all", micro_batch_size=2)
    pairs = list(itertools.combinations(range(4), 2))
    assert got.pairs == [list(p) for p in pairs]
    assert got.scores == pytest.approx(reference_scores(model, ids, pairs), rel=1e-4, abs=1e-7)
    view = ModelView(model)
    assert [view.position(l).lns_factor for l in range(4)] == pytest.approx(
        [1 / math.sqrt(l + 1) if kw.get("lns") else 1.0 for l in range(4)])
    if kw.get("norm") == "mix":
        assert [view.position(l).placement for l in range(4)] == ["post", "post", "pre", "pre"]


def test_moving_whole_modules_would_carry_the_lns_factor_along(ids):
    """The rule is observable: the swapped stream equals the weight-swap reference and differs from what swapping
    the block *modules* (factor and placement travel with them) gives."""
    model = depthlab_model(lns=True, norm="mix", mix_fraction=0.5)
    engine = Engine(model, ids)
    base = next(engine.baselines())
    ours = engine.resume(base, 0, base.hs[0], plan={0: 3, 3: 0})
    reference = hidden_states(with_weights_swapped(model, 0, 3), ids)[-1]
    blocks = list(ModelView(model).blocks)
    blocks[0], blocks[3] = blocks[3], blocks[0]
    travelled = with_blocks(model, blocks, lambda: hidden_states(model, ids))[-1]
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - travelled).norm() > 0.05 * ours.norm()


def test_hf_sliding_window_type_and_layer_index_stay_with_the_position():
    """Gemma-2 alternates sliding-window and full attention by position; a 3-token window makes it matter."""
    torch.manual_seed(0)
    cfg = T.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=32,
                         sliding_window=3, initializer_range=0.25)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    view = ModelView(model)
    assert [view.position(l).attention_type for l in range(3)] == [
        "sliding_attention", "full_attention", "sliding_attention"]
    pairs = [(0, 1), (1, 2), (0, 2)]
    got = permutation_scores(model, ids, pairs=pairs)
    assert got.scores == pytest.approx(reference_scores(model, ids, pairs), rel=1e-4, abs=1e-7)
    layer_idx = [view.blocks[l].self_attn.layer_idx for l in range(3)]
    assert layer_idx == [0, 1, 2]  # running another block's weights never renumbers the modules


def test_blocks_with_different_weight_layouts_are_not_swapped():
    """Qwen2-MoE with a dense first block: pairs with it score NaN, the MoE pair is measured."""
    torch.manual_seed(0)
    cfg = T.Qwen2MoeConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
                           mlp_only_layers=[0], initializer_range=0.25)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    got = permutation_scores(model, ids, pairs="all")
    assert math.isnan(got.scores[0]) and math.isnan(got.scores[1])
    assert got.scores[2] == pytest.approx(reference_scores(model, ids, [(1, 2)])[0], rel=1e-4, abs=1e-7)
    assert got.mean_score == pytest.approx(got.scores[2])
