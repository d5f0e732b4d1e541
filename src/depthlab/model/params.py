"""Parameter and FLOP accounting from a config alone (no model is built, so paper-scale shapes cost nothing).

Conventions: *embedding* parameters are the token embedding and the LM head (counted once when tied), following
Kaplan et al.; *active* parameters count the non-expert parameters plus k/E of the routed experts' parameters.
Training FLOPs per token = 6·(active parameters excluding the input embedding) + 12·L·d·T (attention scores and
mixing, PaLM's convention, not halved for causality).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from depthlab.config import ModelConfig


@dataclass
class ParamCounts:
    total: int
    """All parameters."""
    active: int
    """Parameters a token actually uses: non-expert + k/E of routed expert parameters."""
    embedding: int
    """Token embedding + LM head (once when tied)."""
    experts: int
    """Routed expert parameters (0 for dense)."""
    flops_per_token: float
    """Training FLOPs per token (forward + backward) at the model's seq_len."""

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def to_dict(self) -> dict:
        return {**asdict(self), "total_non_embedding": self.total_non_embedding,
                "active_non_embedding": self.active_non_embedding}

    def summary(self) -> str:
        moe = f" | active {human(self.active)} ({human(self.active_non_embedding)} non-emb)" if self.experts else ""
        return (f"params {human(self.total)} ({human(self.total_non_embedding)} non-embedding){moe} | "
                f"{self.flops_per_token / 1e6:.1f} MFLOPs/token")


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, L, V, hd = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    norm = d if cfg.norm_affine else 0
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2 + (2 * hd if cfg.qk_norm else 0)
    block_norms = 2 * norm + (2 * norm if cfg.norm in ("peri",) else 0)
    moe = cfg.moe
    if moe.num_experts:
        h_e = moe.expert_hidden or cfg.hidden
        experts = moe.num_experts * 3 * d * h_e
        ffn_fixed = d * moe.num_experts + 3 * d * moe.shared_expert_hidden
        ffn_active = ffn_fixed + moe.top_k * 3 * d * h_e
    else:
        experts, ffn_fixed = 0, 3 * d * cfg.hidden
        ffn_active = ffn_fixed
    embedding = V * d * (1 if cfg.tie_embeddings else 2)
    total = embedding + norm + L * (attn + block_norms + ffn_fixed + experts)
    active = embedding + norm + L * (attn + block_norms + ffn_active)
    matmul_params = active - V * d if not cfg.tie_embeddings else active  # the input lookup is not a matmul
    flops = 6 * matmul_params + 12 * L * d * cfg.seq_len
    return ParamCounts(total=total, active=active, embedding=embedding, experts=L * experts, flops_per_token=flops)
