"""Per-layer profiles of the residual stream: variance (SPEC §5.1) and angular distance / block influence (§5.2).

Both are read straight off the cached baseline: no intervention, one pass. Sums over tokens are accumulated in
fp64 and divided at the end, so micro-batching does not change the result. The per-token statistics are
`depthlab.measures` (the same functions the training statistics use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.analysis.engine import Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.measures import feature_variance, token_norm


@dataclass
class VarianceProfile(Result):
    out_var: list[float]
    """Mean over tokens of the feature variance of h_{l+1}, the raw block output (pre-final-norm)."""
    attn_var: list[float]
    """The same statistic for the attention branch as it is added to the stream: after any post-sub-layer norm
    (Peri-LN, Gemma-2/3, OLMo-2) and residual scale (`depthlab.model.view`); null where unavailable."""
    ffn_var: list[float]
    """The same statistic for the FFN (or MoE) branch as it is added to the stream."""
    attn_norm: list[float]
    """Mean per-token L2 norm of the attention branch output."""
    ffn_norm: list[float]
    """Mean per-token L2 norm of the FFN branch output."""
    stream_norm: list[float]
    """Mean per-token L2 norm of h_{l+1}."""
    relative_update: list[float]
    """mean ||h_{l+1} - h_l|| / mean ||h_l||."""
    embed_var: float
    """Feature variance of h_0 (the embedding output)."""
    final_norm_var: float
    """Feature variance after the final norm (not "last-layer variance": that is out_var[-1])."""
    tokens: int
    branches_unavailable: str | None = None
    """Why the branch columns are null for some blocks (e.g. "blocks 0-5: ..."); None when all were measured."""


def variance_profile(model, input_ids, *, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
                     engine: Engine | None = None, progress: bool = False) -> VarianceProfile:
    """Per-block variance and norms of the stream and of each branch (SPEC §5.1, §3 definitions)."""
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    missing = {l: why for l in range(L) if (why := eng.stack.branch_unavailable(l)) is not None}
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in
            ("out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm", "stream_norm", "update", "in_norm")}
    embed_var = final_var = 0.0
    tokens = 0
    for base in tqdm(eng.baselines(branches=True), total=eng.num_batches, desc="variance", disable=not progress,
                     leave=False):
        hs = base.hs
        tokens += base.ids.numel()
        embed_var += feature_variance(hs[0]).sum().item()
        with torch.no_grad():
            final_var += feature_variance(eng.stack.final_norm(hs[-1])).sum().item()
        for l in range(L):
            sums["out_var"][l] += feature_variance(hs[l + 1]).sum()
            sums["stream_norm"][l] += token_norm(hs[l + 1]).sum()
            sums["in_norm"][l] += token_norm(hs[l]).sum()
            sums["update"][l] += token_norm(hs[l + 1].double() - hs[l].double()).sum()
            if l in missing:
                continue
            for name in ("attn", "ffn"):
                sums[f"{name}_var"][l] += feature_variance(base.branches[name][l]).sum()
                sums[f"{name}_norm"][l] += token_norm(base.branches[name][l]).sum()
    sums = {k: eng.all_sum(v) for k, v in sums.items()}  # over data-parallel ranks (a no-op in one process)
    embed_var, final_var, tokens = eng.all_sum(torch.tensor([embed_var, final_var, tokens], dtype=torch.float64))
    embed_var, final_var, tokens = embed_var.item(), final_var.item(), int(tokens.item())
    for k in ("attn_var", "ffn_var", "attn_norm", "ffn_norm"):
        sums[k][list(missing)] = torch.nan
    mean = {k: (v / tokens).tolist() for k, v in sums.items()}
    rel = (sums["update"] / sums["in_norm"].clamp_min(1e-300)).tolist()
    return VarianceProfile(mean["out_var"], mean["attn_var"], mean["ffn_var"], mean["attn_norm"], mean["ffn_norm"],
                           mean["stream_norm"], rel, embed_var / tokens, final_var / tokens, tokens,
                           branches_unavailable=_describe(missing))


def _describe(missing: dict[int, str]) -> str | None:
    """{layer: reason} → "blocks 0, 2: reason; block 5: other reason"."""
    by_reason: dict[str, list[int]] = {}
    for layer, why in missing.items():
        by_reason.setdefault(why, []).append(layer)
    parts = [f"block{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls))}: {why}" for why, ls in by_reason.items()]
    return "; ".join(parts) or None


@dataclass
class AngularDistance(Result):
    angular_distance: list[float]
    """Mean over tokens of arccos(cos(h_l, h_{l+1}))/π per block."""
    block_influence: list[float]
    """ShortGPT block influence 1 - mean cos(h_l, h_{l+1})."""
    window_distance: list[list[float]]
    """window_distance[n-1][l] = mean arccos(cos(h_l, h_{l+n}))/π, the distance across blocks l..l+n-1."""
    best_windows: list[dict]
    """For each window size n: the start block with the smallest distance (Gromov et al.'s pruning candidate)."""
    last_token_only: bool
    tokens: int


    def best_window(self, n: int) -> dict:
        return self.best_windows[n - 1]


def angular_distance(model, input_ids, *, last_token_only: bool = False, micro_batch_size: int = 8,
                     cache_budget_mb: float = 2048.0, engine: Engine | None = None,
                     progress: bool = False) -> AngularDistance:
    """Angular distance between block inputs and outputs, block influence and the best n-block windows (§5.2).

    Cosines are computed token by token (row-wise dot products of unit vectors), never as a token × token matrix.
    """
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    ang = [torch.zeros(L - n + 1, dtype=torch.float64) for n in range(1, L + 1)]
    cos_sum = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    for base in tqdm(eng.baselines(), total=eng.num_batches, desc="angular", disable=not progress, leave=False):
        states = torch.stack([h[:, -1:] if last_token_only else h for h in base.hs]).double()
        units = (states / states.norm(dim=-1, keepdim=True).clamp_min(1e-300)).flatten(1, 2)  # [L+1, tok, d]
        tokens += units.shape[1]
        for n in range(1, L + 1):
            cos = (units[:-n] * units[n:]).sum(-1).clamp(-1.0, 1.0)  # [L+1-n, tok]
            ang[n - 1] += (torch.arccos(cos) / math.pi).sum(-1)
            if n == 1:
                cos_sum += cos.sum(-1)
    ang, cos_sum = [eng.all_sum(a) for a in ang], eng.all_sum(cos_sum)  # over data-parallel ranks
    tokens = int(eng.all_sum(torch.tensor(tokens, dtype=torch.float64)).item())
    windows = [(a / tokens).tolist() for a in ang]
    best = []
    for n, row in enumerate(windows, start=1):
        start = min(range(len(row)), key=row.__getitem__)
        best.append({"n": n, "start": start, "blocks": list(range(start, start + n)), "distance": row[start]})
    return AngularDistance(windows[0], (1.0 - cos_sum / tokens).tolist(), windows, best, last_token_only, tokens)
