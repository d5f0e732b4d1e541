"""What the dense (`depthlab.model.hf`) and the MoE (`depthlab.model.hf_moe`) Hugging Face mappings share: the
parameter names of the Llama-style layout and the config fields common to every exported family."""

from __future__ import annotations

from depthlab.config import ModelConfig

BLOCK_NAMES = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
}
"""depthlab name → HF name, per block (dense Llama/Qwen3 layout; MoE models replace the ``ffn.*`` entries)."""
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
"""depthlab name → HF name outside the blocks."""


def common_config(cfg: ModelConfig) -> dict:
    """HF config fields shared by every family depthlab exports to (dense and MoE)."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "bos_token_id": None,
            "eos_token_id": None, "intermediate_size": cfg.hidden}
