"""Per-layer statistics logged during training (SPEC §3).

While a `LayerStats` is attached, every block reports its branch outputs and output stream; the accumulator adds
fp32 *sums over tokens* into one device tensor (no host sync), so micro-batches and ranks combine exactly by
summation. `finish()` all-reduces once and turns the sums into per-layer means.

Variances are population variances across the d features of each token (the stream's spread at that token), then
averaged over tokens. `out_var` is the raw residual stream h_{l+1}, never the post-final-norm state, which is logged
separately as `final_norm_var`.

For MoE models the routers report too (`depthlab.model.moe.RoutingStats`): expert loads from the top-k actually
used, router entropy and the auxiliary losses, packed into the same single all-reduce.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from depthlab.model.moe import RoutingStats

# Column layout of the accumulator: one row per block.
BASE_FIELDS = ("out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm", "out_norm")
MOMENT_FIELDS = ("out_skew", "out_kurtosis", "out_outlier_frac")


def _token_var(x: torch.Tensor) -> torch.Tensor:
    return x.float().var(dim=-1, unbiased=False)


class LayerStats:
    """Accumulates SPEC §3 statistics for the blocks of one model over any number of forward passes."""

    def __init__(self, n_layers: int, device: torch.device, moments: bool = False):
        self.fields = BASE_FIELDS + (MOMENT_FIELDS if moments else ())
        self.moments = moments
        self.sums = torch.zeros(n_layers, len(self.fields), dtype=torch.float64, device=device)
        self.final = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of final-norm var, tokens]
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.device = device
        self.routing: RoutingStats | None = None  # created on first attach to an MoE model

    @torch.no_grad()
    def update(self, index: int, attn: torch.Tensor, ffn: torch.Tensor, out: torch.Tensor) -> None:
        sums = [_token_var(out).sum(), _token_var(attn).sum(), _token_var(ffn).sum(),
                attn.float().norm(dim=-1).sum(), ffn.float().norm(dim=-1).sum(), out.float().norm(dim=-1).sum()]
        if self.moments:
            h = out.float()
            z = (h - h.mean(-1, keepdim=True)) / h.std(-1, unbiased=False, keepdim=True).clamp_min(1e-12)
            sums += [z.pow(3).mean(-1).sum(), z.pow(4).mean(-1).sum(), (z.abs() > 3).float().mean(-1).sum()]
        self.sums[index] += torch.stack(sums).double()
        if index == 0:
            self.tokens += out.shape[:-1].numel()

    @torch.no_grad()
    def update_final(self, h: torch.Tensor) -> None:
        self.final[0] += _token_var(h).sum().double()
        self.final[1] += h.shape[:-1].numel()

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        """Route the blocks' reports to this accumulator for the duration of the context."""
        blocks = list(model.blocks)
        if self.routing is None:
            self.routing = RoutingStats.for_model(model, self.device)
        for b in blocks:
            b.stats = self
        try:
            with self.routing.attached() if self.routing is not None else contextlib.nullcontext():
                yield self
        finally:
            for b in blocks:
                b.stats = None

    def finish(self, extra_per_layer: list[dict] | None = None) -> dict:
        """All-reduce (when distributed) and return ``{"sample_tokens": N, "final_norm_var": v, "layers": [...]}``."""
        parts = [self.sums.flatten(), self.final, self.tokens[None]]
        if self.routing is not None:
            parts.append(self.routing.sums.flatten())
        packed = torch.cat(parts)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        values = packed.tolist()  # the one host sync
        n_layers, k = self.sums.shape
        base = n_layers * k + 3
        tokens = values[base - 1]
        routing, summary = self.routing.summarize(values[base:], tokens) if self.routing is not None else (None, {})
        layers = []
        for i in range(n_layers):
            row = values[i * k:(i + 1) * k]
            entry = {"layer": i, **{f: row[j] / tokens for j, f in enumerate(self.fields)}}
            if routing:
                entry.update(routing[i])
            if extra_per_layer:
                entry.update(extra_per_layer[i])
            layers.append(entry)
        final_sum, final_tokens = values[n_layers * k:n_layers * k + 2]
        return {"sample_tokens": int(tokens), "final_norm_var": final_sum / max(final_tokens, 1), **summary,
                "layers": layers}


@torch.no_grad()
def block_norms(model: nn.Module, grads: bool) -> list[dict]:
    """Per-block L2 norm of the parameters (and of their gradients when `grads`)."""
    out = []
    for block in model.blocks:
        params = [p for p in block.parameters()]
        entry = {"param_norm": torch.linalg.vector_norm(torch.stack([p.float().norm() for p in params])).item()}
        if grads:
            g = [p.grad.float().norm() for p in params if p.grad is not None]
            entry["grad_norm"] = torch.linalg.vector_norm(torch.stack(g)).item() if g else 0.0
        out.append(entry)
    return out
