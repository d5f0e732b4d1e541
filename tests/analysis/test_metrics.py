"""Every metric against a brute-force reference that edits the block list and runs full forward passes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from depthlab.analysis import (
    analyze,
    angular_distance,
    causal_effects,
    moe_stats,
    permutation_scores,
    variance_profile,
)
from depthlab.model.view import ModelView

from .conftest import Replace, build, full_loss, hidden_states, with_blocks


@pytest.mark.parametrize("family", ["llama", "gpt2", "depthlab"])
def test_causal_effects_match_brute_force_skip(family, ids):
    model = build(family)
    got = causal_effects(model, ids, micro_batch_size=3)
    hs = hidden_states(model, ids)
    L = len(hs) - 1
    delta = [hs[l + 1] - hs[l] for l in range(L)]
    for s in range(L):
        blocks = list(ModelView(model).blocks)
        blocks[s] = Replace(lambda h: h)
        hs_skip = with_blocks(model, blocks, lambda: hidden_states(model, ids))
        for l in range(L):
            if l <= s:
                assert got.matrix[s][l] is None or math.isnan(got.matrix[s][l])
                continue
            d_bar = hs_skip[l + 1] - hs_skip[l]
            ref = (d_bar - delta[l]).double().norm(dim=-1).sum() / delta[l].double().norm(dim=-1).sum()
            assert got.matrix[s][l] == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), (s, l)
    upper = [got.matrix[s][l] for s in range(L) for l in range(s + 1, L)]
    assert got.mean_effect == pytest.approx(sum(upper) / len(upper))


def test_causal_zero_update_block_is_aligned(ids):
    """A block whose update is zero: skipping it changes nothing downstream (row 1 is exactly zero), and the
    effects of skipping block 0 on blocks 2 are still measured at the right index (defect 2)."""
    model = build("llama")
    block = ModelView(model).blocks[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    got = causal_effects(model, ids)
    assert got.matrix[1][2] == 0.0
    assert got.matrix[0][1] == 0.0  # block 1's update stays zero whatever its input
    assert got.matrix[0][2] > 0.01


@pytest.mark.parametrize("family", ["llama", "neox", "mixtral"])
def test_permutation_matches_brute_force_swap(family, ids):
    model = build(family)
    got = permutation_scores(model, ids, pairs="all", micro_batch_size=3)
    base = full_loss(model, ids)
    assert got.pairs == [list(p) for p in itertools.combinations(range(3), 2)]
    for (a, b), score in zip(got.pairs, got.scores):
        blocks = list(ModelView(model).blocks)
        blocks[a], blocks[b] = blocks[b], blocks[a]
        swapped = with_blocks(model, blocks, lambda: full_loss(model, ids))
        assert score == pytest.approx(abs(swapped - base) / base, rel=1e-4, abs=1e-7)
    adjacent = permutation_scores(model, ids, pairs="adjacent")
    assert adjacent.pairs == [[0, 1], [1, 2]]
    assert adjacent.scores == pytest.approx([got.scores[0], got.scores[2]], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "olmo2", "depthlab"])
def test_variance_and_angular_match_hooked_reference(family, ids):
    model = build(family)
    var = variance_profile(model, ids, micro_batch_size=3)
    ang = angular_distance(model, ids, micro_batch_size=3)
    hs = [h.double() for h in hidden_states(model, ids)]
    L = len(hs) - 1
    for l in range(L):
        assert var.out_var[l] == pytest.approx(hs[l + 1].var(-1, unbiased=False).mean().item(), rel=1e-6)
        cos = torch.nn.functional.cosine_similarity(hs[l], hs[l + 1], dim=-1)
        assert ang.angular_distance[l] == pytest.approx((cos.clamp(-1, 1).arccos() / math.pi).mean().item(),
                                                        rel=1e-6)
        assert ang.block_influence[l] == pytest.approx(1 - cos.mean().item(), rel=1e-6)
        rel = (hs[l + 1] - hs[l]).norm(dim=-1).mean() / hs[l].norm(dim=-1).mean()
        assert var.relative_update[l] == pytest.approx(rel.item(), rel=1e-6)
    # branches: for sequential pre-LN blocks (and OLMo-2's post-normed branches) h_{l+1} = h_l + attn + ffn
    cos2 = torch.nn.functional.cosine_similarity(hs[0], hs[2], dim=-1)
    assert ang.window_distance[1][0] == pytest.approx((cos2.arccos() / math.pi).mean().item(), rel=1e-6)
    best = min(range(L), key=lambda l: ang.angular_distance[l])
    assert ang.best_window(1)["start"] == best


def test_branch_outputs_sum_to_the_block_update(ids):
    from depthlab.analysis.engine import Engine

    for family in ("llama", "olmo2", "gpt2"):
        engine = Engine(build(family), ids)
        base = next(engine.baselines(branches=True))
        for l in range(engine.n_layers):
            update = base.hs[l + 1] - base.hs[l]
            assert torch.allclose(base.branches["attn"][l] + base.branches["ffn"][l], update, atol=1e-5), family


def _nan(values):
    return [_nan(v) if isinstance(v, list) else (math.nan if v is None else v) for v in values]


def test_results_do_not_depend_on_micro_batch_size(ids):
    model = build("qwen2")
    ids = torch.cat([ids, ids.flip(0)], 1)
    one = analyze(model, ids, ["variance", "usefulness", "causal", "permutation"], micro_batch_size=1,
                  cache_budget_mb=0)
    four = analyze(model, ids, ["variance", "usefulness", "causal", "permutation"], micro_batch_size=4)
    for name in one:
        a, b = one[name].to_dict(), four[name].to_dict()
        for key in {"variance": ["out_var", "ffn_var"], "usefulness": ["loss_ratios"], "causal": ["matrix"],
                    "permutation": ["scores"]}[name]:
            x = torch.tensor(_nan(a[key]), dtype=torch.float64).nan_to_num()
            y = torch.tensor(_nan(b[key]), dtype=torch.float64).nan_to_num()
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-8), (name, key)


def test_moe_stats_match_router_and_dropped_branch_reference(ids):
    model = build("mixtral")
    got = moe_stats(model, ids, micro_batch_size=3)
    stack = ModelView(model)
    counts = torch.zeros(3, 4)

    def count(layer):
        def hook(module, args, out):  # HF routers return (logits, scores, chosen expert indices)
            counts[layer] += torch.bincount(out[2].flatten(), minlength=4).float()
        return hook

    handles = [stack.router(l).register_forward_hook(count(l)) for l in range(3)]
    base = full_loss(model, ids)
    for h in handles:
        h.remove()
    load = counts / counts.sum(1, keepdim=True)
    assert torch.allclose(torch.tensor(got.load, dtype=torch.float64), load.double(), atol=1e-9)
    assert got.top_k == 2 and got.num_experts == 4
    assert got.imbalance == pytest.approx((load.max(1).values / load.mean(1)).tolist(), rel=1e-6)
    for l in range(3):
        mlp = stack.blocks[l].mlp
        handle = mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        dropped = full_loss(model, ids)
        handle.remove()
        assert got.branch_importance[l] == pytest.approx(dropped / base, rel=1e-4)
