"""Explicit expert sparsity of MoE models (SPEC §5.8): router load, balance, diversity, and MoE-branch importance.

The importance run of block l (its MoE branch removed, the rest of the stack resumed from there) passes the intact
h_l through block l, so the router hooks observe exactly the intact routing while it runs: loads cost nothing extra.
Loads are counted from the router's own top-k choice (HF routers return it; a plain linear router is resolved with
the model's top_k), and a layer whose router never fired is an error, not an all-zero load (defect 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

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
    """mean over layer pairs i<j of 1 − cos(load_i, load_j)."""
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
            logits = logits.float().reshape(-1, logits.shape[-1])
            if isinstance(out, tuple) and len(out) >= 3:
                chosen = out[2]
            else:
                if top_k is None:
                    raise AnalysisError("cannot tell the router's top_k from the model config")
                chosen = logits.topk(top_k, dim=-1).indices
            seen[layer] = (logits, chosen.reshape(-1))
        return record

    E = None
    counts = entropy = None
    tokens = 0
    base_sum, drop_sum = 0.0, torch.zeros(L, dtype=torch.float64)
    handles = [r.register_forward_hook(hook(l)) for l, r in enumerate(routers)]
    try:
        with tqdm(total=eng.num_batches * L, desc="moe", disable=not progress, leave=False) as bar:
            for base in eng.baselines():
                base_sum += base.nll.double().sum().item()
                n_tok = base.ids.numel()
                tokens += n_tok
                for l in range(L):
                    seen.clear()
                    h_last = eng.resume(base, l, base.hs[l], plan={l: Drop("ffn")})
                    if l not in seen:
                        raise AnalysisError(f"the router of block {l} never fired (cannot measure expert load)")
                    logits, chosen = seen[l]
                    if E is None:
                        E = logits.shape[-1]
                        counts = torch.zeros(L, E, dtype=torch.float64)
                        entropy = torch.zeros(L, dtype=torch.float64)
                    counts[l] += torch.bincount(chosen.cpu(), minlength=E).double()
                    logp = logits.log_softmax(-1).double()
                    entropy[l] += -(logp.exp() * logp).sum(-1).sum().cpu()
                    drop_sum[l] += eng.token_nll(h_last, base.ids).double().sum().cpu()
                    bar.update()
    finally:
        for h in handles:
            h.remove()
    load = counts / counts.sum(1, keepdim=True)
    mean = load.mean(1)
    imbalance = load.max(1).values / mean
    balance = (1 - load.std(1, unbiased=False) / mean).clamp_min(0)
    unit = load / load.norm(dim=1, keepdim=True)
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]
    diversity = (sum(1 - (unit[i] @ unit[j]).item() for i, j in pairs) / len(pairs)) if pairs else math.nan
    return MoEStats(load.tolist(), imbalance.tolist(), balance.tolist(), (entropy / tokens).tolist(), diversity,
                    (drop_sum / base_sum).tolist(), int(counts[0].sum().item() // tokens), E)
