"""Defaults shared by `depthlab.analyze` and `depthlab analyze`: plain constants, importable without torch."""

from __future__ import annotations

import math

DEFAULT_METRICS = ("variance", "angular", "usefulness", "causal", "permutation", "weight_sparsity",
                   "attention_sparsity", "moe")
"""What `analyze` and `depthlab analyze` run by default (moe only for MoE models); `all` adds the Jacobian."""
DEFAULT_OPTIONS = {"permutation": {"pairs": "adjacent"}, "jacobian": {"mode": "estimate", "probes": 16,
                                                                      "power_iters": 30}}
"""Per-metric options applied unless overridden: adjacent pairs only (L−1 swaps instead of L(L−1)/2), and the
Rademacher Jacobian estimate instead of d VJPs per block, with at most 30 Lanczos iterations for σ_max (it stops
once converged: 12 on a SmolLM2 block; fewer than needed would leave spectral_norm unreported)."""
NEAR_IDENTITY_ANGLE = 0.05
"""A block is reported near-identity when its mean angular distance arccos(cos)/π is below this (cos > 0.988)."""

FIT_TOKENS_PER_COEF = 32
"""Default fit sample for the usefulness maps: this many tokens per coefficient (d + 1) of each map, where the
held-out excess error of a least-squares fit, about (d+1)/n of the residual, is ~3%."""
MAX_FIT_TOKENS = 65_536
"""Time cap on the default fit sample (one baseline pass over it); the fit's memory, G·L·(d+1)·(2d+1) fp64 sums,
does not grow with it. Wider models get fewer tokens per coefficient, recorded in the result."""


def default_fit_samples(d_model: int, fit_seq_len: int) -> int:
    """Fit sequences of ``fit_seq_len`` tokens for FIT_TOKENS_PER_COEF·(d+1) tokens, capped at MAX_FIT_TOKENS."""
    tokens = min(FIT_TOKENS_PER_COEF * (d_model + 1), MAX_FIT_TOKENS)
    return max(3, math.ceil(tokens / fit_seq_len))
