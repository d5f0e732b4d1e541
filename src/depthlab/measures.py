"""The measurement formulas of depthlab, each defined once (SPEC §3, §5.1, §5.6–5.8).

Training statistics (`depthlab.train.stats`, `depthlab.train.sparsity`) and `depthlab analyze`
(`depthlab.analysis.profiles`, `.sparsity`, `.moe`) call these functions, so a number logged during training and the
same number computed post hoc are one formula with one name. The module sits on the lowest floor: it imports torch and
math only, and every function takes plain tensors (or, for `matrices`, a module) and returns tensors without a host
sync, so the training path can pack everything into one transfer.

Per-token statistics of activations ``x [..., d]`` (§3, §5.1), returned as fp64 *sums over tokens* so micro-batches
and ranks combine by addition; divide by the token count at the end:

    var           population variance across the d features of each token
    norm          L2 norm of each token
    skew, kurtosis  E[z³], E[z⁴] of the token's standardised features z = (x − mean)/std
    outlier_frac  fraction of features with |z| > 3

Weight sparsity of one matrix w with n entries (§5.6):

    frac_below_rel_<ε>  fraction with |w| < ε·max|w|           (ε = 1e-3, 1e-2)
    frac_below_abs_<ε>  fraction with |w| < ε                  (ε = 1e-3)
    hoyer               (sqrt(n) − ||w||₁/||w||₂) / (sqrt(n) − 1)   0 = constant magnitude, 1 = a single non-zero
    histogram           fractions of entries per decade of |w|/max|w|, edges [0, 1e-8, …, 1e-1, 1]

Attention sparsity of causal attention probabilities a_ij (§5.7), per head, averaged over query positions i:

    entropy             −Σ_j a_ij log a_ij (nats)
    normalized_entropy  entropy / log(v_i), v_i the number of keys query i sees; over queries with v_i ≥ 2
    effective_support   1 / Σ_j a_ij²
    top<k>_mass         mass of the k largest a_ij (k = 1, 8)

Expert sparsity from router logits (§5.8), per layer:

    load            fraction of token-slots routed to each expert, from the top-k actually chosen (sums to 1)
    imbalance       max(load) / mean(load)                       1 = perfectly balanced
    balance         max(0, 1 − std(load)/mean(load))             population std; 1 = perfectly balanced
    router_entropy  mean over tokens of the entropy of softmax(logits) (nats)
    diversity       mean over layer pairs i<j of 1 − cos(load_i, load_j)

Undefined values are NaN, never a number that reads as a measurement: Hoyer sparsity of an all-zero matrix or of one
with fewer than two entries (0/0: there is no magnitude distribution), every weight statistic of an empty matrix,
and the diversity of fewer than two layers (there is no pair). Size-weighted means over matrices skip NaN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REL_EPS = (1e-3, 1e-2)
"""Relative magnitude thresholds ε of ``|w| < ε·max|w|``."""
ABS_EPS = 1e-3
"""Absolute magnitude threshold: 1/20 of the 0.02 init std, so a fresh matrix has about 4% of its weights below it."""
HISTOGRAM_DECADES = 8
"""Decades of |w|/max|w| in the magnitude histogram; smaller ratios (zeros included) fall into the first bin."""
TOP_MASS = (1, 8)
"""k of the top-k attention mass."""
OUTLIER_Z = 3.0
"""|z| above which a feature of the stream counts as an outlier."""

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Per-token statistics of the stream and of the branches (SPEC §3, §5.1)

def feature_variance(x: torch.Tensor) -> torch.Tensor:
    """Population variance across the last (feature) dimension, per token, in fp64."""
    return x.to(_F64).var(dim=-1, unbiased=False)


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's feature vector, in fp64."""
    return torch.linalg.vector_norm(x.to(_F64), dim=-1)


def token_sums(x: torch.Tensor, moments: bool = False) -> dict[str, torch.Tensor]:
    """Sums over all tokens of ``x [..., d]`` of `var` and `norm` (and, with `moments`, `skew`, `kurtosis`,
    `outlier_frac`), as 0-d fp64 tensors."""
    h = x.to(_F64)
    var = h.var(dim=-1, unbiased=False)
    out = {"var": var.sum(), "norm": torch.linalg.vector_norm(h, dim=-1).sum()}
    if moments:
        z = (h - h.mean(-1, keepdim=True)) / var.sqrt().clamp_min(1e-12).unsqueeze(-1)
        out["skew"] = z.pow(3).mean(-1).sum()
        out["kurtosis"] = z.pow(4).mean(-1).sum()
        out["outlier_frac"] = (z.abs() > OUTLIER_Z).to(_F64).mean(-1).sum()
    return out


def token_count(x: torch.Tensor) -> int:
    """Number of tokens in activations ``x [..., d]``."""
    return x.shape[:-1].numel()


# ---------------------------------------------------------------------------------------------------------------
# Weight sparsity (SPEC §5.6)

def matrices(block: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices of a block by name without the ``.weight`` suffix (``attn.wq``, ``ffn.experts.w_up``,
    ``self_attn.q_proj``…). Stacked expert weights count as one matrix over all experts; 1-D norm weights and biases
    are not matrices."""
    return {name.removesuffix(".weight"): p for name, p in block.named_parameters() if p.ndim >= 2}


def hoyer(w: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity ``(sqrt(n) − ||w||₁/||w||₂)/(sqrt(n) − 1)`` as a 0-d fp64 tensor; NaN when undefined
    (n < 2 or w = 0)."""
    w = w.detach().flatten().to(_F64)
    n = w.numel()
    if n < 2:
        return torch.full((), math.nan, dtype=_F64, device=w.device)
    ratio = w.abs().sum() / w.norm()  # 0/0 = NaN for w = 0
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


def weight_sparsity(w: torch.Tensor, rel_eps: tuple[float, ...] = REL_EPS,
                    abs_eps: float = ABS_EPS) -> dict[str, torch.Tensor]:
    """``frac_below_rel_<ε>``, ``frac_below_abs_<ε>`` and ``hoyer`` of one weight tensor, as 0-d fp64 tensors."""
    a = w.detach().abs().to(_F64).flatten()
    n = a.numel()
    peak = a.max() if n else a.new_zeros(())
    out = {f"frac_below_rel_{eps:g}": (a < eps * peak).sum().to(_F64) / n for eps in rel_eps}
    out[f"frac_below_abs_{abs_eps:g}"] = (a < abs_eps).sum().to(_F64) / n
    out["hoyer"] = hoyer(w)
    return out


def histogram_edges(decades: int = HISTOGRAM_DECADES) -> list[float]:
    """Bin edges of `magnitude_histogram` in units of max|w|: ``[0, 1e-decades, …, 1e-1, 1]``."""
    return [0.0] + [10.0 ** -p for p in range(decades, 0, -1)] + [1.0]


def magnitude_histogram(w: torch.Tensor, decades: int = HISTOGRAM_DECADES) -> torch.Tensor:
    """Fractions of the entries of `w` per bin of `histogram_edges` (fp64, summing to 1; bins are [lo, hi), the
    last one closed; zeros fall into the first bin)."""
    a = w.detach().abs().to(_F64).flatten()
    rel = a / a.max().clamp_min(torch.finfo(_F64).tiny) if a.numel() else a
    inner = torch.tensor(histogram_edges(decades)[1:-1], dtype=_F64, device=a.device)
    counts = torch.bincount(torch.bucketize(rel, inner, right=True), minlength=decades + 1)
    return counts.to(_F64) / a.numel()


def size_weighted_mean(values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``Σ size·value / Σ size`` over the finite values (NaN when none is finite)."""
    ok = values.isfinite()
    return (values[ok] * sizes[ok]).sum() / sizes[ok].sum()


# ---------------------------------------------------------------------------------------------------------------
# Attention sparsity (SPEC §5.7)

def attention_probabilities(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                            is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + mask)`` in fp32 with the argument conventions of ``scaled_dot_product_attention``
    (q [..., H, T, hd], k [..., Hkv, S, hd] with H a multiple of Hkv (GQA); bool mask: True = attend; a causal
    query i attends to keys 0..S−T+i)."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    T, S = scores.shape[-2:]
    if is_causal:
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.float()
    return scores.softmax(-1)


ATTENTION_KEYS = ("entropy", "normalized_entropy", "effective_support", *(f"top{k}_mass" for k in TOP_MASS))


def attention_sums(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head, sums over batch and query positions of the §5.7 statistics of causal attention probabilities
    ``probs [*batch, H, T, S]`` (rows = queries; query i sees v_i = S − T + i + 1 keys), in fp64 [H].

    Besides the `ATTENTION_KEYS`, holds the counts they are averaged over: ``queries`` and ``normalized_queries``
    (those with v_i ≥ 2). Sums of several calls add key by key; `attention_means` divides.
    """
    p = probs.to(_F64)
    T, S = p.shape[-2:]
    batch_dims = tuple(range(p.dim() - 3))
    per_query = lambda v: v.sum(dim=(*batch_dims, -1))  # [*batch, H, T] → [H]
    entropy = -torch.xlogy(p, p).sum(-1)  # 0·log 0 = 0
    visible = torch.arange(S - T + 1, S + 1, dtype=_F64, device=p.device)
    normed = visible >= 2
    ranked = p.topk(min(max(TOP_MASS), S), dim=-1).values
    batch = math.prod(p.shape[:-3])
    out = {"entropy": per_query(entropy),
           "normalized_entropy": per_query((entropy / visible.log()).where(normed, 0.0)),
           "effective_support": per_query(1.0 / p.pow(2).sum(-1))}
    for k in TOP_MASS:
        out[f"top{k}_mass"] = per_query(ranked[..., :k].sum(-1))
    out["queries"] = torch.tensor(float(batch * T), dtype=_F64, device=p.device)
    out["normalized_queries"] = torch.tensor(float(batch * int(normed.sum())), dtype=_F64, device=p.device)
    return out


def attention_means(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-head means [H] of summed `attention_sums` (normalized_entropy over the queries that have it)."""
    return {k: sums[k] / sums["normalized_queries" if k == "normalized_entropy" else "queries"]
            for k in ATTENTION_KEYS}


def add_sums(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-by-key sum of two dicts of sums (`total` may be empty)."""
    return {k: total[k] + v if k in total else v for k, v in part.items()}


# ---------------------------------------------------------------------------------------------------------------
# Expert sparsity (SPEC §5.8)

def routing_sums(logits: torch.Tensor, top_k: int, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over the tokens of router logits ``[..., E]``, as one fp64 vector of length 2E + 3:
    ``[slot counts per expert (E), router-probability sums (E), router-entropy sum, logsumexp² sum, tokens]``.

    `chosen` are the experts the router actually used (any shape, E-valued indices); without it the top-k of the
    softmax, the same choice as depthlab's MoE (`softmax` then `topk`, in fp32).
    """
    logits = logits.detach().float().reshape(-1, logits.shape[-1])
    E = logits.shape[-1]
    lse = logits.logsumexp(-1, keepdim=True)
    logp = logits - lse
    probs = logp.exp()
    if chosen is None:
        chosen = logits.softmax(-1).topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=E).to(_F64)
    entropy = -(probs.to(_F64) * logp.to(_F64)).sum()
    tokens = torch.tensor([float(logits.shape[0])], dtype=_F64, device=logits.device)
    return torch.cat([counts, probs.to(_F64).sum(0), entropy[None], lse.to(_F64).pow(2).sum()[None], tokens])


def routing_fields(row: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named parts of a (summed) `routing_sums` vector: ``counts`` [E], ``prob_sums`` [E], ``entropy_sum``,
    ``lse2_sum``, ``tokens``."""
    E = (row.shape[-1] - 3) // 2
    return {"counts": row[..., :E], "prob_sums": row[..., E:2 * E], "entropy_sum": row[..., 2 * E],
            "lse2_sum": row[..., 2 * E + 1], "tokens": row[..., 2 * E + 2]}


def expert_load(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of token-slots per expert from slot counts ``[..., E]``."""
    counts = counts.to(_F64)
    return counts / counts.sum(-1, keepdim=True)


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """``max(load)/mean(load)`` over the last dimension."""
    return load.max(-1).values / load.mean(-1)


def load_balance(load: torch.Tensor) -> torch.Tensor:
    """``max(0, 1 − std(load)/mean(load))`` over the last dimension (population std)."""
    return (1 - load.std(-1, unbiased=False) / load.mean(-1)).clamp_min(0)


def expert_diversity(loads: torch.Tensor) -> torch.Tensor:
    """``mean_{i<j} (1 − cos(load_i, load_j))`` over the layers of ``loads [L, E]``; NaN for fewer than two layers."""
    L = loads.shape[0]
    if L < 2:
        return torch.full((), math.nan, dtype=_F64, device=loads.device)
    unit = torch.nn.functional.normalize(loads.to(_F64), dim=-1)
    i, j = torch.triu_indices(L, L, offset=1, device=loads.device)
    return (1 - (unit[i] * unit[j]).sum(-1)).mean()


def routing_summary(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """`load` [L, E], `imbalance`, `balance`, `router_entropy` [L] and `diversity` from summed `routing_sums`
    rows ``[L, 2E+3]``."""
    f = routing_fields(rows)
    load = expert_load(f["counts"])
    return {"load": load, "imbalance": load_imbalance(load), "balance": load_balance(load),
            "router_entropy": f["entropy_sum"] / f["tokens"], "diversity": expert_diversity(load)}
