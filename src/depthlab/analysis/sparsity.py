"""Implicit sparsity: of the weights (from weight decay, SPEC §5.6) and of attention (from context length, §5.7).

Attention probabilities come from a separate instrumented pass: while it runs, ``scaled_dot_product_attention`` is
wrapped so that each call also computes softmax(q·kᵀ·scale + mask) explicitly — the model's own fused kernel still
produces the output, so the fast path of every other metric is untouched. Any model whose attention goes through
SDPA (depthlab's own, and Hugging Face models with ``attn_implementation="sdpa"``, the default) is covered.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from depthlab.analysis.engine import validate_ids
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError
from depthlab.model.view import ModelView

HIST_EDGES = [0.0, *(10.0**e for e in range(-8, 2))]  # |w| bins: [0,1e-8), [1e-8,1e-7), ..., [1, 10), open above


@dataclass
class WeightSparsity(Result):
    matrices: list[dict]
    """One row per block and matrix: layer, name, size, fractions below thresholds, hoyer, histogram counts."""
    per_layer_hoyer: list[float]
    """Size-weighted mean Hoyer sparsity of each block's matrices."""
    rel_eps: list[float]
    abs_eps: float
    histogram_edges: list[float]


def hoyer(w: torch.Tensor) -> float:
    """(sqrt(n) − ||w||₁/||w||₂) / (sqrt(n) − 1): 0 for a constant-magnitude vector, 1 for a single non-zero."""
    w = w.double().flatten()
    n = w.numel()
    l2 = w.norm()
    if n < 2 or l2 == 0:
        return float("nan")
    return ((math.sqrt(n) - (w.abs().sum() / l2).item()) / (math.sqrt(n) - 1))


def weight_sparsity(model, input_ids=None, *, rel_eps=(1e-3, 1e-2), abs_eps: float = 1e-3,
                    progress: bool = False) -> WeightSparsity:
    """Per block and matrix: fraction of |w| < ε·max|w|, fraction below an absolute ε, Hoyer sparsity, histogram.

    `input_ids` is accepted for a uniform metric signature and not used: this reads the weights only.
    """
    stack = ModelView(model)
    rows, per_layer = [], []
    edges = torch.tensor(HIST_EDGES + [math.inf], dtype=torch.float64)
    for l, block in enumerate(tqdm(stack.blocks, desc="weight sparsity", disable=not progress, leave=False)):
        weighted, total = 0.0, 0
        for name, p in block.named_parameters():
            if p.dim() < 2:
                continue
            a = p.detach().double().abs().flatten()
            peak = a.max().item()
            row = {"layer": l, "matrix": name, "size": a.numel()}
            for eps in rel_eps:
                row[f"frac_below_rel_{eps:g}"] = (a < eps * peak).double().mean().item()
            row[f"frac_below_abs_{abs_eps:g}"] = (a < abs_eps).double().mean().item()
            row["hoyer"] = hoyer(a)
            row["histogram"] = torch.histogram(a.cpu(), bins=edges).hist.long().tolist()
            rows.append(row)
            if math.isfinite(row["hoyer"]):
                weighted += row["hoyer"] * a.numel()
                total += a.numel()
        per_layer.append(weighted / total if total else float("nan"))
    return WeightSparsity(rows, per_layer, list(rel_eps), abs_eps, HIST_EDGES)


@dataclass
class AttentionSparsity(Result):
    entropy: list[list[float]]
    """[layer][head] mean over queries of −Σ_j a_ij log a_ij (nats)."""
    normalized_entropy: list[list[float]]
    """The same divided by log(i+1), over queries i >= 1 (1 = uniform over the visible prefix)."""
    effective_support: list[list[float]]
    """[layer][head] mean over queries of 1/Σ_j a_ij²."""
    top1_mass: list[list[float]]
    top8_mass: list[list[float]]
    layer_entropy: list[float]
    layer_normalized_entropy: list[float]
    layer_effective_support: list[float]


def attention_probs(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) in fp32, with SDPA's argument conventions (bool mask: True = attend)."""
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
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


@contextlib.contextmanager
def _observe_sdpa(on_probs):
    """Wrap F.scaled_dot_product_attention so every call also reports its attention probabilities."""
    original = F.scaled_dot_product_attention

    def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **kwargs):
        on_probs(attention_probs(query, key, attn_mask, is_causal, scale, enable_gqa))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kwargs)

    F.scaled_dot_product_attention = wrapped
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_sparsity(model, input_ids, *, micro_batch_size: int = 8, progress: bool = False) -> AttentionSparsity:
    """Attention entropy, normalised entropy, effective support and top-k mass per layer and head (SPEC §5.7)."""
    stack = ModelView(model)
    ids_all = validate_ids(input_ids, stack)
    model.eval()
    L = stack.n_layers
    sums: dict[int, dict[str, torch.Tensor]] = {}
    counts = {"q": 0, "q1": 0}
    current = {"layer": None}

    def on_probs(p):  # p [B, H, T, S]
        layer = current["layer"]
        if layer is None:
            return
        ent_terms = torch.where(p > 0, -p * p.clamp_min(1e-30).log(), 0.0)
        ent = ent_terms.sum(-1).double()  # [B, H, T]
        T = p.shape[-2]
        logs = torch.log(torch.arange(1, T + 1, dtype=torch.float64, device=p.device))
        norm_ent = ent[..., 1:] / logs[1:]
        top = p.topk(min(8, p.shape[-1]), dim=-1).values.double()
        s = sums.setdefault(layer, {k: 0 for k in ("ent", "norm", "support", "top1", "top8")})
        s["ent"] = s["ent"] + ent.sum((0, 2)).cpu()
        s["norm"] = s["norm"] + norm_ent.sum((0, 2)).cpu()
        s["support"] = s["support"] + (1.0 / (p.double() ** 2).sum(-1)).sum((0, 2)).cpu()
        s["top1"] = s["top1"] + top[..., 0].sum((0, 2)).cpu()
        s["top8"] = s["top8"] + top.sum(-1).sum((0, 2)).cpu()

    def enter(layer):
        def hook(module, args):
            current["layer"] = layer
        return hook

    handles = [b.register_forward_pre_hook(enter(l)) for l, b in enumerate(stack.blocks)]
    device = next(model.parameters()).device
    try:
        with _observe_sdpa(on_probs), torch.no_grad():
            batches = range(0, len(ids_all), micro_batch_size)
            for i in tqdm(batches, desc="attention sparsity", disable=not progress, leave=False):
                ids = ids_all[i:i + micro_batch_size].to(device)
                current["layer"] = None
                model(ids, **stack.forward_kwargs)
                counts["q"] += ids.shape[0] * ids.shape[1]
                counts["q1"] += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        for h in handles:
            h.remove()
    if len(sums) != L:
        raise AnalysisError(f"attention probabilities were observed in {len(sums)} of {L} blocks: the model must use "
                            "scaled_dot_product_attention (load Hugging Face models with attn_implementation='sdpa')")
    per = {k: torch.stack([sums[l][k] for l in range(L)]) / (counts["q1"] if k == "norm" else counts["q"])
           for k in ("ent", "norm", "support", "top1", "top8")}
    return AttentionSparsity(per["ent"].tolist(), per["norm"].tolist(), per["support"].tolist(),
                             per["top1"].tolist(), per["top8"].tolist(), per["ent"].mean(1).tolist(),
                             per["norm"].mean(1).tolist(), per["support"].mean(1).tolist())
