"""The decoder-only transformer depthlab trains (SPEC §2): OLMo-2/Llama style, with every depth/sparsity knob.

    embed → blocks[0..L-1] → norm (final RMSNorm) → lm_head

Block `l` (pre-LN): ``u = x + Attn(N1(x)·s_l)``; ``y = u + FFN(N2(u)·s_l)`` with ``s_l = 1/sqrt(l+1)`` under LayerNorm
Scaling, else 1. ``post`` normalises the residual sum instead, ``peri`` also normalises each branch output, ``mix``
makes the first ``floor(L·mix_fraction)`` blocks post-LN.

`Block.forward(x)` needs nothing but the stream: positions are 0..T-1 and RoPE tables are computed on demand, so a
block can be run in isolation, skipped or moved by the analysis engine. The model carries no instrumentation: the
trainer's statistics (`depthlab.train.stats`) and the analysis read it through forward hooks on its modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig
from depthlab.measures import attention_probabilities
from depthlab.model.layers import SwiGLU, init_stds
from depthlab.model.moe import MoE


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the input dtype (bf16 sums of squares lose too much precision)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


class Rotary(nn.Module):
    """RoPE in the rotate-half convention of Hugging Face Llama, so exported weights need no permutation.

    ``rope(x) = x·cos + rotate_half(x)·sin`` with ``rotate_half(x1, x2) = (−x2, x1)``. The sign is folded into the
    sine table (``sin_signed = (−sin, sin)`` by half), so ``rope(x) = x·cos + swap(x)·sin_signed``: the same values
    bit for bit (negation is exact) without a negated copy of every query and key. The tables are plain cached
    tensors, not buffers: they are never saved and survive meta-device init.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` [seq_len, head_dim]."""
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            n = max(seq_len, self.max_len)
            inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
            freqs = torch.outer(torch.arange(n, device=device).float(), inv_freq)
            cos, sin = freqs.cos(), freqs.sin()
            self._cache = (n, device, torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
        _, _, cos, sin = self._cache
        return cos[:seq_len], sin[:seq_len]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        swapped = torch.cat([x2, x1], dim=-1)
        return (x.float() * cos + swapped.float() * sin_signed).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with `n_heads` query and `n_kv_heads` key/value heads (GQA group size n_heads/n_kv)."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = [rotary]  # a list hides the shared module from state_dict/parameters

    def reset_parameters(self, std: float, out_std: float) -> None:
        for lin, s in ((self.wq, std), (self.wk, std), (self.wv, std), (self.wo, out_std)):
            nn.init.normal_(lin.weight, 0.0, s)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [B,H,T,hd] and keys/values [B,Hkv,T,hd]."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary[0].tables(T, x.device)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [B,H,T,T] (instrumented path; training keeps fused SDPA)."""
        q, k, _ = self.qkv(x)
        return attention_probabilities(q, k, is_causal=True)


def build_ffn(cfg: ModelConfig) -> nn.Module:
    return MoE(cfg) if cfg.moe.num_experts else SwiGLU(cfg.d_model, cfg.hidden)


def block_placement(cfg: ModelConfig, index: int) -> str:
    """The norm placement of block `index`: Mix-LN resolves to post for the first floor(L·f) blocks, pre after."""
    if cfg.norm == "mix":
        return "post" if index < math.floor(cfg.n_layers * cfg.mix_fraction) else "pre"
    return cfg.norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, rotary: Rotary):
        super().__init__()
        self.placement = block_placement(cfg, index)
        # A plain float, not a buffer: it cannot be lost by meta-device init or a partial state dict.
        self.scale = 1.0 / math.sqrt(index + 1) if cfg.lns else 1.0
        self.attn = Attention(cfg, rotary)
        self.ffn = build_ffn(cfg)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        if self.placement == "peri":
            self.attn_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
            self.ffn_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)

    def branch_output(self, name: str) -> nn.Module:
        """The module whose output is the `name` ("attn" | "ffn") branch as added to the stream: the branch itself,
        or its output norm under peri-LN."""
        out_norm = getattr(self, f"{name}_out_norm", None)
        return out_norm if out_norm is not None else getattr(self, name)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """The block's parameters in registration order: attention, FFN, norms."""
        self.attn.reset_parameters(std, out_std)
        self.ffn.reset_parameters(std, out_std)
        for norm in (self.norm1, self.norm2, getattr(self, "attn_out_norm", None), getattr(self, "ffn_out_norm", None)):
            if norm is not None:
                norm.reset_parameters()

    def scaled(self, h: torch.Tensor) -> torch.Tensor:
        """``h·s_l``; without LayerNorm Scaling (s = 1) no multiply at all (the same values, one pass less)."""
        return h * self.scale if self.scale != 1.0 else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":
            a = self.attn(self.scaled(x))
            u = self.norm1(x + a)
            f = self.ffn(self.scaled(u))
            y = self.norm2(u + f)
        else:
            a = self.attn(self.scaled(self.norm1(x)))
            if self.placement == "peri":
                a = self.attn_out_norm(a)
            u = x + a
            f = self.ffn(self.scaled(self.norm2(u)))
            if self.placement == "peri":
                f = self.ffn_out_norm(f)
            y = u + f
        return y


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    """Cross-entropy plus the weighted MoE auxiliary losses (what is optimised)."""
    ce_loss: torch.Tensor | None = None
    """Mean next-token cross-entropy alone."""
    aux_loss: torch.Tensor | None = None
    """Sum over blocks of the weighted MoE auxiliary losses (0 for dense models)."""


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building a model")
        self.config = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, self.rotary) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix and embedding, ones for norms, the output projections at out_std
        (`depthlab.model.layers.init_stds`); each module initialises its own parameters, in parameter order."""
        std, out_std = init_stds(self.config)
        nn.init.normal_(self.embed.weight, 0.0, std)
        for block in self.blocks:
            block.reset_parameters(std, out_std)
        self.norm.reset_parameters()
        if self.lm_head.weight is not self.embed.weight:
            nn.init.normal_(self.lm_head.weight, 0.0, std)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        """Logits [B,T,V]; with `targets` [B,T] (already shifted: target t is the token after t) also the loss."""
        if input_ids.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's context "
                             f"(model.seq_len={self.config.seq_len})")
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        logits = self.lm_head(h)
        if targets is None:
            return LMOutput(logits)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        aux = self.aux_loss()
        return LMOutput(logits, ce + aux, ce, aux)

    def aux_loss(self) -> torch.Tensor:
        """Weighted MoE auxiliary losses of the last forward pass, summed over blocks (0 for dense models)."""
        losses = [b.ffn.aux_loss for b in self.blocks if getattr(b.ffn, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations (no KV cache: depthlab models are small; HF export is the fast path)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.seq_len:]).logits[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
