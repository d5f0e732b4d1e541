"""Mixture-of-experts FFN (SPEC §2): linear router, softmax, dropless token-choice top-k, optional shared expert.

    p = softmax(router(x))                  router: nn.Linear(d → E, no bias), softmax in fp32
    chosen, w = top_k(p)                    w = the chosen experts' probabilities (option: renormalised to sum 1)
    y = Σ_j w_j · Expert_{chosen_j}(x)  [+ Shared(x)]

*Dropless*: every token reaches all k of its experts (no capacity factor), so the output never depends on which other
tokens share the batch. The experts are computed grouped: token-slots are sorted by expert and each expert is one
matmul over its contiguous group (one `F.grouped_mm` call for the fused gate/up projection and one for the down
projection when the shapes allow it, else a loop over experts) — never a loop over tokens.

Auxiliary losses, per layer, both divided by the number of layers L exactly once (SPEC §9 defect 4):

    lb = (E/k) · Σ_e f_e · P_e      f_e = fraction of the batch's tokens routed to e (Σ_e f_e = k)
                                    P_e = mean router probability of e (the only differentiable factor)
    z  = mean_tokens(logsumexp(logits)²)
    aux_loss = (w_lb·lb + w_z·z) / L

With f_e counted per *token* (equivalently E·Σ_e load_e·P_e with load_e the fraction of token-*slots*, Σ load = 1),
uniform routing — uniform f or uniform P — gives lb = 1 exactly.

Gradient accumulation: f_e is a property of the whole optimizer batch, but a micro-batch's backward runs before the
later micro-batches are seen. `batch_routing` pins the whole batch's counts first with a no-grad routing pre-pass
(one extra forward per optimizer step, only when accumulating); each micro-batch then contributes
``(E/k)·Σ_e f_e^batch·P_e^micro`` and z over its own tokens, and since P and z are token means, the mean over equal
micro-batches is exactly the full-batch loss — value and gradient. Under data parallelism the counts are all-reduced
(once per step in the pre-pass; without accumulation, once per layer inside the training forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights in nn.Linear orientation: w_gate, w_up [E,H,d], w_down [E,d,H]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, 0.0, init_std)
        # F.grouped_mm needs 16-byte aligned strides in its backward: every matrix dim a multiple of 8 covers
        # fp32 and bf16. Odd toy shapes take the per-expert loop instead (same numbers, tested against each other).
        self.grouped = d_model % 8 == 0 and hidden % 8 == 0

    def forward(self, x: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`x` [M, d]: token-slots sorted by expert, `counts[e]` of them for expert e; `scale` [M] the routing
        weights → weighted expert outputs [M, d].

        Gate and up projections run as one matmul on the concatenated weights (the copy is E·2H·d, small next to
        the activations), and the routing weight scales the hidden activation — ``w·down(h) = down(w·h)`` — where it
        is H wide instead of d.
        """
        gate, up = self._matmul(x, torch.cat([self.w_gate, self.w_up], dim=1), counts).chunk(2, dim=-1)
        h = F.silu(gate) * up * scale.unsqueeze(-1).to(up.dtype)
        return self._matmul(h, self.w_down, counts)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Row group e of `x` times ``w[e]ᵀ``."""
        if self.grouped and (x.device.type == "cpu" or _compute_dtype(x) == torch.bfloat16):
            dtype = _compute_dtype(x)
            offsets = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(x.to(dtype), w.to(dtype).transpose(-2, -1), offs=offsets)
        # One matmul per expert; counts.tolist() is a host sync on GPU, the price of odd shapes or fp32 on CUDA.
        groups = x.split(counts.tolist())
        return torch.cat([F.linear(g, w[e]) for e, g in enumerate(groups)])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of `x` (grouped_mm is not on autocast's op list, so we cast ourselves)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class MoE(nn.Module):
    """The MoE FFN branch: maps the normed stream [B,T,d] to the branch output [B,T,d].

    After each forward: `aux_loss` (weighted, differentiable: what is optimised), `lb_loss` and `z_loss`
    (unweighted, detached, for logging).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.top_k, self.renormalize = moe.num_experts, moe.top_k, moe.renormalize
        self.router = nn.Linear(cfg.d_model, moe.num_experts, bias=False)
        nn.init.normal_(self.router.weight, 0.0, cfg.init_std)
        self.experts = Experts(moe.num_experts, cfg.d_model, moe.expert_hidden or cfg.hidden, cfg.init_std)
        if moe.shared_expert_hidden:
            from depthlab.model.transformer import SwiGLU

            self.shared = SwiGLU(cfg.d_model, moe.shared_expert_hidden)
            for lin in (self.shared.w_gate, self.shared.w_up, self.shared.w_down):
                nn.init.normal_(lin.weight, 0.0, cfg.init_std)
        else:
            self.shared = None
        # Divided by L here, once; the model sums the layers' aux_loss without further scaling.
        self.lb_coef = moe.lb_weight / cfg.n_layers
        self.z_coef = moe.z_weight / cfg.n_layers
        self.aux_loss: torch.Tensor | None = None
        self.lb_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        # [counts per expert..., tokens] (fp64) of the whole optimizer batch, pinned by `batch_routing`.
        self.batch_counts: torch.Tensor | None = None
        # Where the routing pre-pass adds this layer's [counts..., tokens] (set only inside `batch_routing`).
        self.count_sink: torch.Tensor | None = None
        # A row of RoutingStats.sums while training statistics are being collected.
        self.stats: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens `x` [N,d]: router logits and probabilities [N,E] (fp32), the chosen experts [N,k] and their
        weights [N,k] (fp32)."""
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n, k = x.shape[0], self.top_k
        logits, probs, chosen, weights = self.route(x)
        slot_expert = chosen.flatten()  # slot n·k + j of token n goes to expert chosen[n, j]
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        order = slot_expert.argsort(stable=True)  # slots grouped by expert
        # Cast before gathering: under autocast the k-fold copy moves half the bytes.
        expert_in = x.to(_compute_dtype(x)).index_select(0, order // k)
        expert_out = self.experts(expert_in, counts, weights.flatten()[order])
        slots = torch.empty_like(expert_out).index_copy_(0, order, expert_out)  # back to token-major slot order
        y = slots.view(n, k, -1).sum(1)  # a plain sum over each token's k slots: deterministic on every device
        if self.shared is not None:
            y = y + self.shared(x)
        self._aux_losses(logits, probs, counts, n)
        return y.to(x.dtype).view(shape)

    def _aux_losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, n: int) -> None:
        with torch.no_grad():
            local = torch.cat([counts.double(), counts.new_tensor([n], dtype=torch.float64)])
        if self.count_sink is not None:  # routing pre-pass: only the counts are wanted
            self.count_sink += local
            return
        lse = torch.logsumexp(logits, -1)
        with torch.no_grad():
            if self.stats is not None:
                entropy = -(probs * (logits - lse.unsqueeze(-1))).sum()  # log p = logits − lse
                self.stats += torch.cat([local[:-1], probs.sum(0).double(), entropy.double()[None],
                                         lse.pow(2).sum().double()[None], local[-1:]])
            if self.batch_counts is not None:
                batch = self.batch_counts
            elif self.training and _distributed():
                batch = local.clone()
                tdist.all_reduce(batch)
            else:
                batch = local
            f = (batch[:-1] / batch[-1]).float()  # fraction of the batch's tokens routed to each expert
        lb = self.num_experts / self.top_k * (f * probs.mean(0)).sum()
        z = lse.pow(2).mean()
        self.aux_loss = self.lb_coef * lb + self.z_coef * z
        self.lb_loss, self.z_loss = lb.detach(), z.detach()


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE FFNs of a depthlab Transformer, in block order (empty for a dense model)."""
    return [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]


@contextlib.contextmanager
def batch_routing(model: nn.Module, micro_batches: Sequence[torch.Tensor],
                  autocast: contextlib.AbstractContextManager | None = None) -> Iterator[None]:
    """Within the context, every MoE layer's load-balancing f_e is that of the whole batch (all micro-batches, all
    ranks), so accumulated losses and gradients equal the full-batch ones.

    Cost: one no-grad forward over `micro_batches` (the same micro-batch shapes the training passes use, so the
    routing decisions are the same ones), plus one all-reduce of L×(E+1) numbers under data parallelism. `model`
    is the bare Transformer (under FSDP2 its own forward gathers the shards). A single micro-batch needs no
    pre-pass: its own forward sees the whole (rank's) batch, and the counts are all-reduced inside it.
    """
    layers = moe_layers(model)
    if not layers or len(micro_batches) == 1:
        yield
        return
    counts = torch.zeros(len(layers), layers[0].num_experts + 1, dtype=torch.float64, device=micro_batches[0].device)
    try:
        for layer, row in zip(layers, counts):
            layer.count_sink = row
        with torch.no_grad(), autocast or contextlib.nullcontext():
            for xs in micro_batches:
                model(xs)
    finally:
        for layer in layers:
            layer.count_sink = None
    if _distributed():
        tdist.all_reduce(counts)
    for layer, row in zip(layers, counts):
        layer.batch_counts = row
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_counts = None


class RoutingStats:
    """Per-layer routing statistics for layer_stats.jsonl (SPEC §5.8), accumulated on device over micro-batches.

    One row per MoE layer: [slot counts per expert (E), router-probability sums (E), router-entropy sum,
    logsumexp² sum, tokens]. Rows are filled by the MoE layers themselves (from the top-k they actually used) while
    attached; `summarize` turns all-reduced rows into loads and losses and refuses rows that missed forward passes.
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
        for layer, row in zip(self.layers, self.sums):
            layer.stats = row
        try:
            yield
        finally:
            for layer in self.layers:
                layer.stats = None

    def summarize(self, values: list[float], tokens: float) -> tuple[list[dict], dict]:
        """Per-layer dicts and cross-layer summary from the flattened (all-reduced) `sums`; `tokens` is what each
        block processed, so a layer whose router did not report every pass is an error, never a zero load."""
        E, k = self.num_experts, self.top_k
        width = 2 * E + 3
        layers, loads = [], []
        for i in range(len(self.layers)):
            row = values[i * width:(i + 1) * width]
            n = row[-1]
            if n != tokens:
                raise RuntimeError(f"MoE layer {i} routed {n:.0f} tokens but its block saw {tokens:.0f}: "
                                   "routing statistics missed forward passes")
            counts, prob_sums = torch.tensor(row[:E]), torch.tensor(row[E:2 * E])
            load = counts / (n * k)  # fraction of token-slots per expert, sums to 1
            lb = E / k * float((counts / n * prob_sums / n).sum())
            z = row[2 * E + 1] / n
            mean, std = load.mean(), load.std(unbiased=False)
            layers.append({"moe_load": load.tolist(), "moe_imbalance": float(load.max() / mean),
                           "moe_balance": max(0.0, float(1 - std / mean)), "router_entropy": row[2 * E] / n,
                           "lb_loss": lb, "z_loss": z, "lb_loss_weighted": self.lb_coef * lb,
                           "z_loss_weighted": self.z_coef * z})
            loads.append(load)
        return layers, {"moe_diversity": expert_diversity(torch.stack(loads))}


def expert_diversity(loads: torch.Tensor) -> float:
    """``mean_{i<j} (1 − cos(load_i, load_j))`` over layers (SPEC §5.8); 0 for fewer than two layers."""
    if loads.shape[0] < 2:
        return 0.0
    unit = F.normalize(loads.double(), dim=-1)
    cos = unit @ unit.T
    i, j = torch.triu_indices(len(loads), len(loads), offset=1)
    return float((1 - cos[i, j]).mean())
