"""Explicit expert sparsity of MoE models (SPEC §5.8): router load, balance, diversity, and MoE-branch importance.

The importance run of block l (its MoE branch removed, the rest of the stack resumed from there) passes the intact
h_l through block l, so the router hooks observe exactly the intact routing while it runs: loads cost nothing extra.
Loads are counted from the router's own top-k choice (HF routers return it; a plain linear router is resolved with
the model's top_k), and a layer whose router never fired is an error, not an all-zero load (defect 3). The
formulas and their names are `depthlab.measures` (`routing_sums`, `routing_summary`), shared with the training
statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab import measures
from depthlab.analysis.engine import Drop, Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError


@dataclass
class MoEStats(Result):
    load: list[list[float]]
    """load[l][e]: fraction of layer l's token-slots routed to expert e."""
    imbalance: list[float]
    """max load / mean load per layer (1 is perfectly balanced)."""
    balance: list[float]
    """max(0, 1 − std/mean) of the load per layer."""
    router_entropy: list[float]
    """Mean over tokens of the entropy of the router's softmax distribution (nats)."""
    diversity: float
    """mean over layer pairs i<j of 1 − cos(load_i, load_j) (None for a single layer: there is no pair)."""
    branch_importance: list[float]
    """Loss ratio when layer l's MoE branch is removed (resumed from the post-attention state)."""
    top_k: int
    num_experts: int


def moe_stats(model, input_ids, *, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
              engine: Engine | None = None, progress: bool = False) -> MoEStats:
    """Per-layer expert load and balance, router entropy, diversity across layers and MoE-branch importance."""
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    routers = [eng.stack.router(l) for l in range(L)]
    if any(r is None for r in routers):
        raise AnalysisError(f"{type(model).__name__} has no MoE router in every block; moe_stats needs an MoE model")
    top_k = eng.stack.top_k
    seen: dict = {}

    def hook(layer):
        def record(module, args, out):
            logits = out[0] if isinstance(out, tuple) else out
            chosen = out[2] if isinstance(out, tuple) and len(out) >= 3 else None
            if chosen is None and top_k is None:
                raise AnalysisError("cannot tell the router's top_k from the model config")
            seen[layer] = measures.routing_sums(logits, top_k, chosen).cpu()
        return record

    rows = None
    base_sum, drop_sum = 0.0, torch.zeros(L, dtype=torch.float64)
    handles = [r.register_forward_hook(hook(l)) for l, r in enumerate(routers)]
    try:
        with tqdm(total=eng.num_batches * L, desc="moe", disable=not progress, leave=False) as bar:
            for base in eng.baselines():
                base_sum += base.nll.double().sum().item()
                for l in range(L):
                    seen.clear()
                    h_last = eng.resume(base, l, base.hs[l], plan={l: Drop("ffn")})
                    if l not in seen:
                        raise AnalysisError(f"the router of block {l} never fired (cannot measure expert load)")
                    if rows is None:
                        rows = torch.zeros(L, seen[l].numel(), dtype=torch.float64)
                    rows[l] += seen[l]
                    drop_sum[l] += eng.token_nll(h_last, base.ids).double().sum().cpu()
                    bar.update()
    finally:
        for h in handles:
            h.remove()
    # Over data-parallel ranks (no-ops in one process).
    rows, drop_sum = eng.all_sum(rows), eng.all_sum(drop_sum)
    base_sum = eng.all_sum(torch.tensor(base_sum, dtype=torch.float64)).item()
    summary = measures.routing_summary(rows)
    fields = measures.routing_fields(rows)
    return MoEStats(summary["load"].tolist(), summary["imbalance"].tolist(), summary["balance"].tolist(),
                    summary["router_entropy"].tolist(), summary["diversity"].item(),
                    (drop_sum / base_sum).tolist(), int(fields["counts"][0].sum() // fields["tokens"][0]),
                    fields["counts"].shape[-1])
