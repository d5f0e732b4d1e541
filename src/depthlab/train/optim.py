"""AdamW with decoupled weight decay on chosen parameter groups, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from depthlab.config import OptimizerConfig, ScheduleConfig


def decay_groups(model: nn.Module, opt: OptimizerConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (decayed, not decayed).

    Weight matrices are decayed; norms (1-D parameters) only with `decay_norms`; the token embedding (and a tied LM
    head, which is the same tensor) only with `decay_embeddings`. An untied LM head is a weight matrix and is decayed.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids:
            (decay if opt.decay_embeddings else no_decay).append(p)
        elif p.ndim < 2:
            (decay if opt.decay_norms else no_decay).append(p)
        else:
            decay.append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = decay_groups(model, opt)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps CPU runs bitwise reproducible across resume (same kernel order every step).
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)


def lr_at(step: int, max_steps: int, peak: float, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `peak`, cosine to `alpha_f·peak`."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    span = max(1, max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    floor = sched.alpha_f * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
