"""Interventions on the block stack: causal effect of skipping a block, and block permutation (SPEC §5.5).

Both resume from the cached stream instead of re-running the model: skipping block s restarts from h_s at position
s+1, swapping blocks a < b restarts from h_a. Block updates are read from the engine (the stream entering and
leaving each position), never from HF ``hidden_states``, so the matrix rows and columns are the blocks themselves.
A swap exchanges only the blocks' weights: what belongs to a position — LayerNorm Scaling's 1/sqrt(l+1), the Mix-LN
placement, the layer index of RoPE/KV cache, a sliding-window type, the call's masks — stays there (SPEC §1,
`depthlab.model.view`). Blocks with different weight layouts (a dense block and an MoE block) cannot exchange
positions; their pairs score NaN.
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.analysis.engine import Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1).double().flatten()


@dataclass
class CausalEffects(Result):
    matrix: list[list[float]]
    """C[s][l] = Σ_tok ||Δ̄_l − Δ_l|| / Σ_tok ||Δ_l|| for l > s (block s skipped); NaN (null) where l <= s."""
    max_matrix: list[list[float]]
    """Csordás et al.'s variant: the maximum over tokens of ||Δ̄_l − Δ_l|| / ||Δ_l||."""
    mean_effect: float
    """Mean of the strict upper triangle of `matrix`."""
    per_skip_mean: list[float]
    """Mean over l > s of C[s][l] for each skipped block s (NaN for the last block)."""


def causal_effects(model, input_ids, *, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
                   engine: Engine | None = None, progress: bool = False) -> CausalEffects:
    """The full L×L causal-effect matrix of skipping each block on every later block's update."""
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    num = torch.zeros(L, L, dtype=torch.float64, device=eng.device)
    den = torch.zeros(L, dtype=torch.float64, device=eng.device)
    peak = torch.zeros(L, L, dtype=torch.float64, device=eng.device)
    with tqdm(total=eng.num_batches * L, desc="causal", disable=not progress, leave=False) as bar:
        for base in eng.baselines():
            deltas = [base.hs[l + 1] - base.hs[l] for l in range(L)]
            norms = [_token_norm(d) for d in deltas]
            den += torch.stack([n.sum() for n in norms])

            def record(position, skipped, x, y, deltas=deltas, norms=norms):
                # The runs `skipped` (run s skips block s) stacked: [k·B, T, d] → per run [k, B·T] token norms.
                k = len(skipped)
                diff = _token_norm((y - x).view(k, *deltas[position].shape) - deltas[position]).view(k, -1)
                rows = torch.tensor(skipped, device=num.device)
                num[rows, position] += diff.sum(1)
                rel = torch.where(norms[position] > 0, diff / norms[position].clamp_min(1e-300),
                                  torch.where(diff > 0, torch.inf, 0.0))
                peak[rows, position] = torch.maximum(peak[rows, position], rel.max(1).values)

            eng.resume_many(base, [(s + 1, base.hs[s], None) for s in range(L)], on_output=record)
            bar.update(L)
    # Summed over data-parallel ranks.
    num, den, peak = eng.all_sum(num).cpu(), eng.all_sum(den).cpu(), eng.all_max(peak).cpu()
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))
    ratio = torch.where(upper, ratio, torch.nan)
    peak = torch.where(upper, peak, torch.nan)
    rows = [ratio[s, s + 1:].mean().item() if s < L - 1 else float("nan") for s in range(L)]
    mean = ratio[upper].mean().item() if L > 1 else float("nan")
    return CausalEffects(ratio.tolist(), peak.tolist(), mean, rows)


@dataclass
class PermutationScores(Result):
    pairs: list[list[int]]
    """The swapped pairs (a, b), a < b."""
    scores: list[float]
    """P(a,b) = |L_swap − L_0| / L_0 for each pair; NaN (null) where the blocks' weight layouts differ."""
    swapped_losses: list[float]
    baseline_loss: float
    mean_score: float
    """Mean over the measured pairs: higher means blocks are less interchangeable."""
    matrix: list[list[float]]
    """scores placed at [a][b] and [b][a]; NaN (null) for pairs not measured."""


def check_pairs(pairs) -> str | list[tuple[int, int]]:
    """The form of a `pairs` option, before the model is known: "all", "adjacent", or a non-empty list of pairs of
    two different block indices (→ sorted tuples); anything else is a one-line AnalysisError."""
    if isinstance(pairs, str) and pairs in ("all", "adjacent"):
        return pairs

    def is_pair(p) -> bool:
        return (isinstance(p, list | tuple) and len(p) == 2 and p[0] != p[1]
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in p))

    if isinstance(pairs, str) or not isinstance(pairs, list | tuple) or not pairs or not all(map(is_pair, pairs)):
        raise AnalysisError(f"pairs must be 'all', 'adjacent' or a list of pairs of different block indices such as "
                            f"[[0, 1], [2, 3]], got {pairs!r}")
    return [tuple(sorted(int(v) for v in p)) for p in pairs]


def resolve_pairs(pairs, n_layers: int) -> list[tuple[int, int]]:
    """"all" | "adjacent" | an explicit list of (a, b) → sorted pairs, validated against the model's blocks."""
    pairs = check_pairs(pairs)
    if pairs == "all":
        return list(itertools.combinations(range(n_layers), 2))
    if pairs == "adjacent":
        return [(a, a + 1) for a in range(n_layers - 1)]
    for a, b in pairs:
        if a < 0 or b >= n_layers:
            raise AnalysisError(f"invalid block pair ({a}, {b}) for a model with {n_layers} blocks")
    return pairs


def permutation_scores(model, input_ids, *, pairs="all", micro_batch_size: int = 8,
                       cache_budget_mb: float = 2048.0, engine: Engine | None = None,
                       progress: bool = False) -> PermutationScores:
    """Loss change when blocks a and b exchange positions (each keeps its weights, runs at the other's position)."""
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    chosen = resolve_pairs(pairs, L)
    if not chosen:
        raise AnalysisError("permutation scores need at least one pair of blocks (the model has one block)")
    measured = [i for i, (a, b) in enumerate(chosen) if eng.stack.swappable(a, b)]
    base_sum = 0.0
    swap_sum = torch.full((len(chosen),), torch.nan, dtype=torch.float64)
    swap_sum[measured] = 0.0
    with tqdm(total=eng.num_batches * len(measured), desc="permutation", disable=not progress, leave=False) as bar:
        for base in eng.baselines():
            base_sum += base.nll.double().sum().item()
            runs = [(a, base.hs[a], {a: b, b: a}) for a, b in (chosen[i] for i in measured)]
            for i, h_last in zip(measured, eng.resume_many(base, runs)):
                swap_sum[i] += eng.token_nll(h_last, base.ids).double().sum()
            bar.update(len(measured))
    base_sum = eng.all_sum(torch.tensor(base_sum, dtype=torch.float64)).item()  # over data-parallel ranks
    swap_sum = eng.all_sum(swap_sum)
    tokens = eng.input_ids.shape[0] * (eng.input_ids.shape[1] - 1)
    loss0 = base_sum / tokens
    losses = swap_sum / tokens
    scores = (losses - loss0).abs() / loss0
    matrix = torch.full((L, L), torch.nan, dtype=torch.float64)
    for (a, b), p in zip(chosen, scores):
        matrix[a, b] = matrix[b, a] = p
    return PermutationScores([list(p) for p in chosen], scores.tolist(), losses.tolist(), loss0,
                             scores.nanmean().item(), matrix.tolist())
