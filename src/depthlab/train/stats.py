"""Per-layer statistics logged during training (SPEC §3), collected by forward hooks on the model's modules.

While a `LayerStats` is attached (`attached(model)`), hooks on each block's branch outputs (`Block.branch_output`:
the attention / FFN module, or its output norm under peri-LN), on each block and on the final norm add fp64 *sums
over tokens* into one device tensor (no host sync), so micro-batches and ranks combine exactly by summation.
`finish()` all-reduces once and turns the sums into per-layer means. Outside `attached` the model runs without any
hook, so the training fast path is untouched.

The per-token statistics are `depthlab.measures.token_sums`, the same functions `depthlab analyze` uses: variances
are population variances across the d features of each token, then averaged over tokens. `out_var` is the raw
residual stream h_{l+1}, never the post-final-norm state, which is logged separately as `final_norm_var`.

For MoE models `RoutingStats` hooks the routers too: expert loads from the top-k the MoE actually used, router
entropy and the auxiliary losses, packed into the same single all-reduce. The per-layer keys are those of
`depthlab.measures.routing_summary` prefixed ``moe_`` (``moe_load``, ``moe_imbalance``, ``moe_balance``,
``moe_router_entropy``; top level ``moe_diversity``), plus the whole step's ``lb_loss``/``z_loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from depthlab import measures
from depthlab.model.moe import MoE, balance_loss, choose_experts, moe_layers

# Column layout of the accumulator: one row per block.
BASE_FIELDS = ("out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm", "out_norm")
MOMENT_FIELDS = ("out_skew", "out_kurtosis", "out_outlier_frac")


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

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[LayerStats]:
        """Hook the blocks, their branches and the final norm of `model` (the bare Transformer) for the duration of
        the context."""
        if self.routing is None:
            self.routing = RoutingStats.for_model(model, self.device)
        def tap(index: int, name: str):
            moments = self.moments and name == "out"
            keys = ("var", "norm", "skew", "kurtosis", "outlier_frac") if moments else ("var", "norm")
            columns = [self.fields.index(f"{name}_{key}") for key in keys]  # e.g. out_var, out_norm, out_skew…

            @torch.no_grad()
            def hook(module, args, output):
                sums = measures.token_sums(output, moments=moments)
                self.sums[index, columns] += torch.stack([sums[key] for key in keys])
                if name == "out" and index == 0:
                    self.tokens += measures.token_count(output)
            return hook

        @torch.no_grad()
        def final(module, args, output):
            self.final += torch.stack([measures.feature_variance(output).sum(),
                                       self.final.new_tensor(measures.token_count(output))])

        handles = [model.norm.register_forward_hook(final)]
        for i, block in enumerate(model.blocks):
            handles += [block.register_forward_hook(tap(i, "out")),
                        block.branch_output("attn").register_forward_hook(tap(i, "attn")),
                        block.branch_output("ffn").register_forward_hook(tap(i, "ffn"))]
        try:
            with self.routing.attached() if self.routing is not None else contextlib.nullcontext():
                yield self
        finally:
            for h in handles:
                h.remove()

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


class RoutingStats:
    """Per-layer routing statistics for layer_stats.jsonl (SPEC §5.8), accumulated on device over micro-batches.

    One `measures.routing_sums` row per MoE layer, added by a forward hook on its router (with the experts the MoE
    chooses, `depthlab.model.moe.choose_experts`) while attached; `summarize` turns all-reduced rows into loads and
    losses and refuses rows that missed forward passes.
    """

    def __init__(self, layers: list[MoE], device: torch.device):
        self.layers = layers
        first = layers[0]
        self.num_experts, self.top_k = first.num_experts, first.top_k
        self.lb_coef, self.z_coef = first.lb_coef, first.z_coef
        self.sums = torch.zeros(len(layers), 2 * self.num_experts + 3, dtype=torch.float64, device=device)

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device) -> RoutingStats | None:
        layers = moe_layers(model)
        return cls(layers, device) if layers else None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        def record(row: torch.Tensor, top_k: int):
            @torch.no_grad()
            def hook(module, args, logits):
                _, _, chosen = choose_experts(logits, top_k)
                row.add_(measures.routing_sums(logits, top_k, chosen))
            return hook

        handles = [layer.router.register_forward_hook(record(row, layer.top_k))
                   for layer, row in zip(self.layers, self.sums)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def summarize(self, values: list[float], tokens: float) -> tuple[list[dict], dict]:
        """Per-layer dicts and cross-layer summary from the flattened (all-reduced) `sums`; `tokens` is what each
        block processed, so a layer whose router did not report every pass is an error, never a zero load."""
        rows = torch.tensor(values, dtype=torch.float64).view(len(self.layers), -1)
        fields = measures.routing_fields(rows)
        for i, n in enumerate(fields["tokens"].tolist()):
            if n != tokens:
                raise RuntimeError(f"MoE layer {i} routed {n:.0f} tokens but its block saw {tokens:.0f}: "
                                   "routing statistics missed forward passes")
        summary = measures.routing_summary(rows)
        n = fields["tokens"].unsqueeze(-1)
        lb = balance_loss(fields["counts"] / n, fields["prob_sums"] / n, self.top_k).tolist()
        z = (fields["lse2_sum"] / fields["tokens"]).tolist()
        layers = [{"moe_load": summary["load"][i].tolist(), "moe_imbalance": summary["imbalance"][i].item(),
                   "moe_balance": summary["balance"][i].item(),
                   "moe_router_entropy": summary["router_entropy"][i].item(), "lb_loss": lb[i], "z_loss": z[i],
                   "lb_loss_weighted": self.lb_coef * lb[i], "z_loss_weighted": self.z_coef * z[i]}
                  for i in range(len(self.layers))]
        return layers, {"moe_diversity": summary["diversity"].item()}


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
