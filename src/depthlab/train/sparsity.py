"""Implicit-sparsity statistics: weight sparsity (SPEC §5.6) and attention sparsity (SPEC §5.7).

The formulas live here once, as functions of plain tensors, so training statistics and `depthlab analyze` measure the
same thing:

- `weight_sparsity(w)`: fractions of weights with ``|w| < ε·max|w|`` (ε = 1e-3, 1e-2), with ``|w| < ε_abs``, and Hoyer
  sparsity ``(sqrt(n) − ||w||₁/||w||₂) / (sqrt(n) − 1)`` (0 for a constant-magnitude matrix, 1 for a single nonzero);
  `magnitude_histogram(w)` for the full distribution.
- `attention_sparsity(probs)`: per head, averaged over query positions i, the entropy ``−Σ_j a_ij log a_ij``, the
  entropy normalised by ``log(i+1)`` (the entropy of uniform attention over the i+1 visible keys; query 0 sees one key,
  so its ratio is 0/0 and it is left out of that average), the effective support ``1/Σ_j a_ij²``, and the top-1 and
  top-8 attention mass.

The training-time wrappers (`weight_sparsity_by_block`, `attention_sparsity_by_layer`) return one dict per block for
layer_stats.jsonl with a single host sync each. Attention probabilities come from a separate no-grad pass over a
fixed probe batch through `Attention.probabilities`, so training itself keeps fused SDPA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REL_EPS = (1e-3, 1e-2)
ABS_EPS = 1e-3
"""Absolute magnitude threshold: 1/20 of the 0.02 init std, so a matrix starts with about 4% of weights below it."""
TOP_MASS = (1, 8)
ATTENTION_PROBE_SEQUENCES = 4
"""Sequences in the fixed probe batch; each is run alone, so memory is one [H,T,T] fp32 map per layer."""


def hoyer(w: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity ``(sqrt(n) − ||w||₁/||w||₂)/(sqrt(n) − 1)`` in fp64 (0 dense-uniform, 1 one-hot)."""
    w = w.detach().flatten().double()
    n = w.numel()
    l2 = w.norm()
    if n < 2 or l2 == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    return (math.sqrt(n) - w.abs().sum() / l2) / (math.sqrt(n) - 1)


def weight_sparsity(w: torch.Tensor, rel_eps: tuple[float, ...] = REL_EPS,
                    abs_eps: float = ABS_EPS) -> dict[str, torch.Tensor]:
    """SPEC §5.6 statistics of one weight tensor, as 0-d fp64 tensors (no host sync).

    Keys: ``rel_<ε>`` (fraction with |w| < ε·max|w|), ``abs_<ε_abs>`` (fraction with |w| < ε_abs), ``hoyer``.
    """
    a = w.detach().abs().float().flatten()
    n = a.numel()
    peak = a.max()
    out = {f"rel_{eps:g}": (a < eps * peak).sum().double() / n for eps in rel_eps}
    out[f"abs_{abs_eps:g}"] = (a < abs_eps).sum().double() / n
    out["hoyer"] = hoyer(w)
    return out


def magnitude_histogram(w: torch.Tensor, decades: int = 8) -> tuple[list[float], list[float]]:
    """Fractions of weights per decade of ``|w|/max|w|``: bin edges ``[0, 1e-decades, …, 1e-1, 1]``.

    Returns (edges, fractions), fractions summing to 1; zeros fall into the first bin.
    """
    a = w.detach().abs().double().flatten()
    rel = a / a.max().clamp_min(torch.finfo(torch.float64).tiny)
    edges = [0.0] + [10.0 ** -p for p in range(decades, 0, -1)] + [1.0]
    inner = torch.tensor(edges[1:-1], dtype=torch.float64, device=a.device)
    counts = torch.bincount(torch.bucketize(rel, inner, right=True), minlength=len(edges) - 1)
    return edges, (counts.double() / a.numel()).tolist()


def matrices(block: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices of a block by type (``attn.wq``, ``ffn.w_down``, ``ffn.experts.w_up``, ``ffn.router``…).

    Stacked expert weights count as one matrix type over all experts; 1-D norm weights are not matrices.
    """
    return {name.removesuffix(".weight"): p for name, p in block.named_parameters() if p.ndim >= 2}


@torch.no_grad()
def weight_sparsity_by_block(model: nn.Module) -> list[dict]:
    """``[{"weight_sparsity": {matrix type: {stat: value}}}, …]`` per block, with one host sync in total."""
    per_block = [{name: weight_sparsity(w) for name, w in matrices(b).items()} for b in model.blocks]
    flat = [v for block in per_block for stats in block.values() for v in stats.values()]
    values = iter(torch.stack(flat).tolist())
    return [{"weight_sparsity": {name: {k: next(values) for k in stats} for name, stats in block.items()}}
            for block in per_block]


def attention_sparsity(probs: torch.Tensor, top: tuple[int, ...] = TOP_MASS) -> dict[str, torch.Tensor]:
    """SPEC §5.7 statistics of causal attention probabilities ``[..., T, T]`` (rows = queries), per leading index
    (e.g. per head), averaged over query positions.

    Keys: ``entropy``, ``entropy_norm`` (over queries 1..T-1), ``support`` (1/Σa²), ``top<k>`` (mass of the k largest).
    """
    p = probs.double()
    T = p.shape[-1]
    entropy = -torch.xlogy(p, p).sum(-1)  # 0·log 0 = 0
    visible = torch.arange(1, T + 1, dtype=torch.float64, device=p.device)  # query i sees i+1 keys
    out = {"entropy": entropy.mean(-1),
           "entropy_norm": (entropy[..., 1:] / visible[1:].log()).mean(-1) if T > 1 else torch.zeros_like(entropy[..., 0]),
           "support": (1.0 / p.pow(2).sum(-1)).mean(-1)}
    ranked = p.topk(min(max(top), T), dim=-1).values
    for k in top:
        out[f"top{k}"] = ranked[..., :k].sum(-1).mean(-1)
    return out


@torch.no_grad()
def attention_sparsity_by_layer(model: nn.Module, probe: torch.Tensor) -> list[dict]:
    """Per block: head-averaged `attention_sparsity` of its attention on the probe batch (token ids [N,T]), plus the
    per-head entropies. Each block's attention input is captured by a forward hook, whatever the norm placement."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]

    def capture(index):
        def hook(module, args, _output):
            for key, value in attention_sparsity(module.probabilities(args[0])[0]).items():
                sums[index][key] = sums[index].get(key, 0) + value
        return hook

    hooks = [b.attn.register_forward_hook(capture(i)) for i, b in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        for seq in probe:
            model(seq[None])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    keys = list(sums[0])
    packed = torch.stack([torch.stack([s[k] for k in keys]) for s in sums]) / len(probe)  # [L, stats, H]
    values = packed.tolist()
    out = []
    for per_layer in values:
        stats = dict(zip(keys, per_layer))
        entry = {f"attn_{k}": sum(v) / len(v) for k, v in stats.items()}
        entry["attn_entropy_heads"] = stats["entropy"]
        out.append(entry)
    return out
