"""Implicit sparsity: of the weights (from weight decay, SPEC §5.6) and of attention (from context length, §5.7).

The formulas, their edge cases and their key names are `depthlab.measures`, shared with the training statistics.

Attention probabilities come from a separate instrumented pass: while it runs, ``scaled_dot_product_attention`` is
wrapped so that each call also computes softmax(q·kᵀ·scale + mask) explicitly — the model's own fused kernel still
produces the output, so the fast path of every other metric is untouched. Any model whose attention goes through
SDPA (depthlab's own, and Hugging Face models with ``attn_implementation="sdpa"``, the default) is covered. Its
statistics are sums over queries: data-parallel ranks (`depthlab.analysis.engine`) run the pass over their share of
the sequences and all-reduce the sums. Weight sparsity reads only the weights, the same on every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthlab import measures
from depthlab.analysis.engine import get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError
from depthlab.model.view import ModelView


@dataclass
class WeightSparsity(Result):
    matrices: list[dict]
    """One row per block and matrix: layer, matrix (`measures.matrices` name), size, ``frac_below_rel_<ε>``,
    ``frac_below_abs_<ε>``, hoyer (None when undefined), histogram (fractions per bin of `histogram_edges`)."""
    per_layer_hoyer: list[float]
    """Size-weighted mean Hoyer sparsity of each block's matrices (undefined ones skipped)."""
    rel_eps: list[float]
    abs_eps: float
    histogram_edges: list[float]
    """Bin edges in units of each matrix's max|w| (decades)."""


def weight_sparsity(model, input_ids=None, *, rel_eps=measures.REL_EPS, abs_eps: float = measures.ABS_EPS,
                    engine=None, progress: bool = False) -> WeightSparsity:
    """Per block and matrix: fraction of |w| < ε·max|w|, fraction below an absolute ε, Hoyer sparsity, histogram.

    `input_ids` and `engine` are accepted for the uniform metric signature and not used: this reads the weights.
    """
    stack = ModelView(model)
    rows, per_layer = [], []
    for l, block in enumerate(tqdm(stack.blocks, desc="weight sparsity", disable=not progress, leave=False)):
        hoyers, sizes = [], []
        for name, w in measures.matrices(block).items():
            stats = measures.weight_sparsity(w, tuple(rel_eps), abs_eps)
            row = {"layer": l, "matrix": name, "size": w.numel(), **{k: v.item() for k, v in stats.items()},
                   "histogram": measures.magnitude_histogram(w).tolist()}
            rows.append(row)
            hoyers.append(stats["hoyer"].cpu())
            sizes.append(float(w.numel()))
        per_layer.append(measures.size_weighted_mean(torch.stack(hoyers), torch.tensor(sizes, dtype=torch.float64))
                         .item() if hoyers else float("nan"))
    return WeightSparsity(rows, per_layer, list(rel_eps), abs_eps, measures.histogram_edges())


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


@contextlib.contextmanager
def _observe_sdpa(on_probs):
    """Wrap F.scaled_dot_product_attention so every call also reports its attention probabilities."""
    original = F.scaled_dot_product_attention

    def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **kwargs):
        on_probs(measures.attention_probabilities(query, key, attn_mask, is_causal, scale))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kwargs)

    F.scaled_dot_product_attention = wrapped
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_sparsity(model, input_ids, *, micro_batch_size: int = 8, engine=None,
                       progress: bool = False) -> AttentionSparsity:
    """Attention entropy, normalised entropy, effective support and top-k mass per layer and head (SPEC §5.7).

    It runs its own instrumented pass (the engine's baseline keeps fused attention): a shared `engine` only lends
    its validated sample, view and data-parallel share of the sequences.
    """
    eng = get_engine(model, input_ids, engine, micro_batch_size, 0)
    stack, rows = eng.stack, eng.sequences
    model.eval()
    L = stack.n_layers
    sums: dict[int, dict[str, torch.Tensor]] = {}
    current = {"layer": None}

    def on_probs(p):  # p [B, H, T, S]
        layer = current["layer"]
        if layer is not None:
            part = {k: v.cpu() for k, v in measures.attention_sums(p).items()}
            sums[layer] = measures.add_sums(sums.get(layer, {}), part)

    def enter(layer):
        def hook(module, args):
            current["layer"] = layer
        return hook

    handles = [b.register_forward_pre_hook(enter(l)) for l, b in enumerate(stack.blocks)]
    device = next(model.parameters()).device
    try:
        with _observe_sdpa(on_probs), torch.no_grad():
            batches = range(rows.start, rows.stop, micro_batch_size)
            for i in tqdm(batches, desc="attention sparsity", disable=not progress, leave=False):
                current["layer"] = None
                model(eng.input_ids[i:min(i + micro_batch_size, rows.stop)].to(device), **stack.forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    if len(sums) != L:
        raise AnalysisError(f"attention probabilities were observed in {len(sums)} of {L} blocks: the model must use "
                            "scaled_dot_product_attention (load Hugging Face models with attn_implementation='sdpa')")
    means = [measures.attention_means({k: eng.all_sum(v) for k, v in sums[l].items()}) for l in range(L)]
    per = {k: torch.stack([m[k] for m in means]) for k in measures.ATTENTION_KEYS}  # [L, H]
    return AttentionSparsity(per["entropy"].tolist(), per["normalized_entropy"].tolist(),
                             per["effective_support"].tolist(), per["top1_mass"].tolist(), per["top8_mass"].tolist(),
                             per["entropy"].mean(1).tolist(), per["normalized_entropy"].mean(1).tolist(),
                             per["effective_support"].mean(1).tolist())
