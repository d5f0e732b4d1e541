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
(one extra forward per optimizer step, only when accumulating; the counts are read by forward hooks on the routers);
each micro-batch then contributes ``(E/k)·Σ_e f_e^batch·P_e^micro`` and z over its own tokens, and since P and z are
token means, the mean over equal micro-batches is exactly the full-batch loss — value and gradient. Under data
parallelism the counts are all-reduced (once per step in the pre-pass; without accumulation, once per layer inside
the training forward — only when gradients are being taken, since only the optimised loss needs global counts).

Routing statistics for training logs are not collected here: `depthlab.train.stats` hooks the routers and calls
`depthlab.measures`, like `depthlab analyze` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig
from depthlab.model.layers import SwiGLU, init_stds


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights in nn.Linear orientation: w_gate, w_up [E,H,d], w_down [E,d,H]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        # F.grouped_mm needs 16-byte aligned strides in its backward: every matrix dim a multiple of 8 covers
        # fp32 and bf16. Odd toy shapes take the per-expert loop instead (same numbers, tested against each other).
        self.grouped = d_model % 8 == 0 and hidden % 8 == 0

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w, s in ((self.w_gate, std), (self.w_up, std), (self.w_down, out_std)):
            nn.init.normal_(w, 0.0, s)

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


def choose_experts(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-choice routing of router logits [N,E]: probabilities softmax(logits) in fp32 [N,E], the top-k
    probabilities [N,k] and the chosen experts [N,k]."""
    probs = logits.float().softmax(-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    return probs, weights, chosen


def balance_loss(token_fraction: torch.Tensor, mean_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``lb = (E/k)·Σ_e f_e·P_e``: f_e the fraction of tokens routed to e (Σ_e f_e = k), P_e the mean router
    probability of e; exactly 1 for uniform routing."""
    return token_fraction.shape[-1] / top_k * (token_fraction * mean_probs).sum(-1)


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
        self.experts = Experts(moe.num_experts, cfg.d_model, moe.expert_hidden or cfg.hidden)
        self.shared = SwiGLU(cfg.d_model, moe.shared_expert_hidden) if moe.shared_expert_hidden else None
        # Divided by L here, once; the model sums the layers' aux_loss without further scaling.
        self.lb_coef = moe.lb_weight / cfg.n_layers
        self.z_coef = moe.z_weight / cfg.n_layers
        self.aux_loss: torch.Tensor | None = None
        self.lb_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        # [counts per expert..., tokens] (fp64) of the whole optimizer batch, pinned by `batch_routing`.
        self.batch_counts: torch.Tensor | None = None
        self.reset_parameters(*init_stds(cfg))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, 0.0, std)
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens `x` [N,d]: router logits and probabilities [N,E] (fp32), the chosen experts [N,k] and their
        weights [N,k] (fp32)."""
        logits = self.router(x).float()
        probs, weights, chosen = choose_experts(logits, self.top_k)
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
        optimised = self.training and torch.is_grad_enabled()  # only the optimised loss needs the global counts
        with torch.no_grad():
            if self.batch_counts is not None:
                batch = self.batch_counts
            else:
                batch = torch.cat([counts.double(), counts.new_tensor([n], dtype=torch.float64)])
                if optimised and _distributed():
                    tdist.all_reduce(batch)
            f = (batch[:-1] / batch[-1]).float()  # fraction of the batch's tokens routed to each expert
        lb = balance_loss(f, probs.mean(0), self.top_k)
        z = torch.logsumexp(logits, -1).pow(2).mean()
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

    def count(layer: MoE, row: torch.Tensor):
        def hook(module, args, logits):
            _, _, chosen = choose_experts(logits, layer.top_k)
            row[:-1] += torch.bincount(chosen.flatten(), minlength=layer.num_experts)
            row[-1] += logits.shape[0]
        return hook

    handles = [layer.router.register_forward_hook(count(layer, row)) for layer, row in zip(layers, counts)]
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            for xs in micro_batches:
                model(xs)
    finally:
        for h in handles:
            h.remove()
    if _distributed():
        tdist.all_reduce(counts)
    for layer, row in zip(layers, counts):
        layer.batch_counts = row
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_counts = None
