"""Every formula of depthlab.measures against a brute-force Python/numpy computation, and its edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from depthlab import measures


def test_token_sums_against_numpy():
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 3 + 1
    x[0, 0, 0] = 40.0  # an outlier feature
    got = {k: v.item() for k, v in measures.token_sums(x.float(), moments=True).items()}
    rows = x.float().double().numpy().reshape(-1, 16)
    z = (rows - rows.mean(1, keepdims=True)) / rows.std(1, keepdims=True)
    assert got["var"] == pytest.approx(rows.var(1).sum(), rel=1e-12)
    assert got["norm"] == pytest.approx(np.linalg.norm(rows, axis=1).sum(), rel=1e-12)
    assert got["skew"] == pytest.approx((z**3).mean(1).sum(), rel=1e-10)
    assert got["kurtosis"] == pytest.approx((z**4).mean(1).sum(), rel=1e-10)
    assert got["outlier_frac"] == pytest.approx((np.abs(z) > 3).mean(1).sum()) and got["outlier_frac"] > 0
    assert measures.token_count(x) == 10
    assert measures.feature_variance(x).shape == (2, 5) and measures.token_norm(x).shape == (2, 5)
    assert set(measures.token_sums(x)) == {"var", "norm"}


def _hoyer_reference(values) -> float:
    a = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    n = a.size
    return (math.sqrt(n) - a.sum() / math.sqrt((a * a).sum())) / (math.sqrt(n) - 1)


def test_hoyer_against_formula_and_its_edge_cases():
    w = torch.randn(6, 5)
    assert measures.hoyer(w).item() == pytest.approx(_hoyer_reference(w.numpy()), rel=1e-12)
    assert measures.hoyer(torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(1.0)  # one non-zero
    assert measures.hoyer(torch.tensor([-2.0, 2.0, 2.0, -2.0])).item() == pytest.approx(0.0)  # constant magnitude
    # Undefined, not 0 (which would read as "dense") nor 1: an all-zero matrix, a single entry, an empty one.
    for undefined in (torch.zeros(3, 4), torch.tensor([5.0]), torch.zeros(0, 4)):
        assert math.isnan(measures.hoyer(undefined).item())


def test_weight_sparsity_against_hand_counts():
    w = torch.tensor([[0.0, 1e-5, -5e-4], [2e-3, -0.5, 1.0]])
    stats = {k: v.item() for k, v in measures.weight_sparsity(w).items()}
    # |w|/max: 0, 1e-5, 5e-4, 2e-3, 0.5, 1 → below 1e-3: three; below 1e-2: four; below abs 1e-3: three.
    assert stats.keys() == {"frac_below_rel_0.001", "frac_below_rel_0.01", "frac_below_abs_0.001", "hoyer"}
    assert stats["frac_below_rel_0.001"] == pytest.approx(3 / 6) and stats["frac_below_rel_0.01"] == pytest.approx(4 / 6)
    assert stats["frac_below_abs_0.001"] == pytest.approx(3 / 6)
    assert stats["hoyer"] == pytest.approx(_hoyer_reference(w.numpy()))
    empty = measures.weight_sparsity(torch.zeros(0, 3))
    assert all(math.isnan(v.item()) for v in empty.values())


def test_magnitude_histogram_bins_by_decade_of_the_max():
    w = torch.tensor([0.0, 1e-9, 5e-4, 0.05, 0.2, -1.0])
    assert measures.histogram_edges(3) == [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    assert measures.magnitude_histogram(w, decades=3).tolist() == pytest.approx([3 / 6, 0.0, 1 / 6, 2 / 6])
    w = torch.randn(40, 30) * torch.logspace(-9, 0, 30)  # magnitudes across many decades
    rel = (w.abs() / w.abs().max()).double().numpy().ravel()
    edges = measures.histogram_edges()
    expected = [((rel >= lo) & ((rel < hi) | (hi == 1.0))).mean() for lo, hi in itertools.pairwise(edges)]
    got = measures.magnitude_histogram(w)
    assert got.tolist() == pytest.approx(expected) and got.sum().item() == pytest.approx(1.0)
    # |w| < ε·max|w| is the sum of the bins below ε
    assert got[:-2].sum().item() == pytest.approx(measures.weight_sparsity(w)["frac_below_rel_0.01"].item())


def test_size_weighted_mean_skips_undefined_values():
    got = measures.size_weighted_mean(torch.tensor([0.5, math.nan, 0.2], dtype=torch.float64),
                                      torch.tensor([10.0, 99.0, 30.0], dtype=torch.float64))
    assert got.item() == pytest.approx((0.5 * 10 + 0.2 * 30) / 40)


def test_attention_probabilities_against_explicit_softmax():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)  # GQA: 4 query heads on 2 kv heads; 3 queries, 5 keys
    got = measures.attention_probabilities(q, k, is_causal=True)
    for b in range(2):
        for h in range(4):
            for i in range(3):
                visible = 5 - 3 + i + 1  # the queries are the last 3 positions of 5
                s = [(q[b, h, i] @ k[b, h // 2, j]).item() / math.sqrt(8) for j in range(visible)]
                e = [math.exp(v - max(s)) for v in s]
                ref = [v / sum(e) for v in e] + [0.0] * (5 - visible)
                assert got[b, h, i].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    masked = measures.attention_probabilities(q, k, attn_mask=mask, scale=0.5)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(masked, scores.softmax(-1))


def _attention_reference(p: torch.Tensor) -> dict[str, float]:
    """Row by row with Python floats for one head [T, T]: every §5.7 statistic averaged over its queries."""
    T = p.shape[0]
    ent, norm, supp, top1, top8 = [], [], [], [], []
    for i in range(T):
        row = [p[i, j].item() for j in range(T)]
        h = -sum(a * math.log(a) for a in row if a > 0)
        ent.append(h)
        if i:
            norm.append(h / math.log(i + 1))
        supp.append(1 / sum(a * a for a in row))
        ranked = sorted(row, reverse=True)
        top1.append(ranked[0])
        top8.append(sum(ranked[:8]))
    mean = lambda v: sum(v) / len(v)
    return {"entropy": mean(ent), "normalized_entropy": mean(norm), "effective_support": mean(supp),
            "top1_mass": mean(top1), "top8_mass": mean(top8)}


def causal_probs(*shape_and_T) -> torch.Tensor:
    *lead, T = shape_and_T
    scores = torch.randn(*lead, T, T) * 2
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).softmax(-1)


def test_attention_statistics_against_row_by_row_reference():
    T = 12
    probs = causal_probs(2, 3, T)  # [batch 2, heads 3, T, T]
    sums = measures.attention_sums(probs)
    assert sums["queries"].item() == 2 * T and sums["normalized_queries"].item() == 2 * (T - 1)
    got = measures.attention_means(sums)
    assert set(got) == set(measures.ATTENTION_KEYS)
    for h in range(3):
        refs = [_attention_reference(probs[b, h]) for b in range(2)]
        for key in measures.ATTENTION_KEYS:
            assert got[key][h].item() == pytest.approx(sum(r[key] for r in refs) / 2, rel=1e-9), key
    # sums of two halves add up to the sums of the whole
    halves = measures.add_sums(measures.attention_sums(probs[:1]), measures.attention_sums(probs[1:]))
    for key, value in measures.attention_means(halves).items():
        torch.testing.assert_close(value, got[key])
    uniform = torch.ones(T, T).tril()
    u = measures.attention_means(measures.attention_sums(uniform / uniform.sum(-1, keepdim=True)))
    assert u["normalized_entropy"].item() == pytest.approx(1.0)
    assert u["effective_support"].item() == pytest.approx((T + 1) / 2)  # mean of 1..T visible keys


def test_routing_sums_against_brute_force():
    E, k = 5, 2
    logits = torch.randn(3, 4, E)
    row = measures.routing_sums(logits, k)
    f = measures.routing_fields(row)
    flat = logits.reshape(-1, E).double()
    counts, probs, ent, lse2 = [0.0] * E, [0.0] * E, 0.0, 0.0
    for t in range(flat.shape[0]):
        z = [v.item() for v in flat[t]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        p = [math.exp(v - lse) for v in z]
        for e in sorted(range(E), key=lambda e: -p[e])[:k]:
            counts[e] += 1
        probs = [a + b for a, b in zip(probs, p)]
        ent -= sum(a * math.log(a) for a in p)
        lse2 += lse * lse
    assert f["counts"].tolist() == counts and f["tokens"].item() == 12
    assert f["prob_sums"].tolist() == pytest.approx(probs, rel=1e-6)
    assert f["entropy_sum"].item() == pytest.approx(ent, rel=1e-6)
    assert f["lse2_sum"].item() == pytest.approx(lse2, rel=1e-6)
    chosen = torch.zeros(12, k, dtype=torch.long)  # an explicit choice overrides the top-k
    assert measures.routing_fields(measures.routing_sums(logits, k, chosen))["counts"].tolist() == [24, 0, 0, 0, 0]


def test_load_balance_statistics_against_numpy():
    counts = torch.tensor([[6.0, 2.0, 0.0, 4.0], [3.0, 3.0, 3.0, 3.0]])
    load = measures.expert_load(counts)
    ref = counts.double().numpy() / counts.double().numpy().sum(1, keepdims=True)
    np.testing.assert_allclose(load.numpy(), ref)
    np.testing.assert_allclose(measures.load_imbalance(load).numpy(), ref.max(1) / ref.mean(1))
    np.testing.assert_allclose(measures.load_balance(load).numpy(),
                               np.maximum(0, 1 - ref.std(1) / ref.mean(1)))
    assert measures.load_balance(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])).item() == 0.0  # clamped at 0 (std > mean)


def test_expert_diversity_over_layer_pairs():
    same = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert measures.expert_diversity(same).item() == pytest.approx(0.0, abs=1e-12)
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert measures.expert_diversity(disjoint).item() == pytest.approx(2 / 3)
    loads = torch.rand(4, 6)
    unit = loads.double().numpy() / np.linalg.norm(loads.double().numpy(), axis=1, keepdims=True)
    ref = np.mean([1 - unit[i] @ unit[j] for i in range(4) for j in range(i + 1, 4)])
    assert measures.expert_diversity(loads).item() == pytest.approx(ref, rel=1e-12)
    assert math.isnan(measures.expert_diversity(torch.rand(1, 6)).item())  # one layer: no pair to compare


def test_routing_summary_combines_the_parts():
    rows = torch.stack([measures.routing_sums(torch.randn(10, 4), 2) for _ in range(3)])
    s = measures.routing_summary(rows)
    f = measures.routing_fields(rows)
    torch.testing.assert_close(s["load"], f["counts"] / 20)
    torch.testing.assert_close(s["router_entropy"], f["entropy_sum"] / 10)
    torch.testing.assert_close(s["diversity"], measures.expert_diversity(s["load"]))
    torch.testing.assert_close(s["balance"], measures.load_balance(s["load"]))
