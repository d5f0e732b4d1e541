"""MoE models to and from standard Hugging Face MoE families, chosen so that every config maps *exactly*.

depthlab's MoE block is pre-LN attention (optionally with per-head QK-norm) plus softmax → top-k routing with the raw
or renormalised probabilities, optionally plus an always-on shared SwiGLU expert. Which HF family computes the same
function depends on the options:

============================  ===================  ==================================================================
depthlab config               HF family            why
============================  ===================  ==================================================================
qk_norm, no shared expert     Qwen3-MoE            per-head QK-norm before RoPE; ``norm_topk_prob`` = renormalize
no qk_norm, renormalize,      Mixtral              Mixtral always renormalises the top-k weights
no shared expert
no qk_norm, otherwise         Qwen2-MoE            ``norm_topk_prob`` = renormalize; the shared expert is gated by
                                                   ``sigmoid(gate·x)``: a zero gate gives exactly 1/2, so the shared
                                                   down-projection is exported ×2 (exact in floating point); without
                                                   a shared expert, a zero-width one (outputs 0)
qk_norm and shared expert     refused              no standard family has both
============================  ===================  ==================================================================

OLMoE is never a target: its QK-norm is over the whole projection (all heads together), not per head. Imports accept
the same three families (a Qwen2-MoE shared-expert gate must be exactly zero, otherwise the gating has no depthlab
equivalent) and refuse the rest with the reason.

The HF in-memory expert layout (transformers ≥ 5) stacks the experts: ``mlp.experts.gate_up_proj`` [E, 2H, d] (gate
rows first) and ``mlp.experts.down_proj`` [E, d, H] — depthlab's ``w_gate``/``w_up`` [E,H,d] concatenated and
``w_down`` as is; ``save_pretrained`` writes the classic per-expert checkpoint format from it.
"""

from __future__ import annotations

import torch

from depthlab.config import ModelConfig, MoEConfig
from depthlab.errors import ModelLoadError
from depthlab.model.hf_common import BLOCK_NAMES, TOP_NAMES, common_config

_FFN_MAP = {"router.weight": "mlp.gate.weight", "experts.w_down": "mlp.experts.down_proj",
            "shared.w_gate.weight": "mlp.shared_expert.gate_proj.weight",
            "shared.w_up.weight": "mlp.shared_expert.up_proj.weight",
            "shared.w_down.weight": "mlp.shared_expert.down_proj.weight"}
SHARED_GATE_SCALE = 2.0
"""sigmoid(0) = 1/2 exactly, so the Qwen2-MoE shared down-projection carries a factor 2 (a power of two: exact)."""


def moe_family(cfg: ModelConfig) -> str:
    """The HF ``model_type`` an MoE config exports to; ModelLoadError naming the keys when there is none."""
    moe = cfg.moe
    if cfg.qk_norm and moe.shared_expert_hidden:
        raise ModelLoadError("cannot export: no standard HF MoE family has both per-head QK-norm (model.qk_norm) and "
                             "a shared expert (model.moe.shared_expert_hidden); drop one of them")
    if cfg.qk_norm:
        return "qwen3_moe"
    if moe.renormalize and not moe.shared_expert_hidden:
        return "mixtral"
    return "qwen2_moe"


def export_moe_state(model, cfg: ModelConfig):
    """``(hf_config, state_dict)`` of the HF MoE model equal to depthlab MoE `model` (fp32, HF parameter names)."""
    family = moe_family(cfg)
    hf_config = _hf_moe_config(cfg, family, common_config(cfg))
    state: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for name, t in own.items():
        t = t.detach().float().clone()
        if name in TOP_NAMES:
            state[TOP_NAMES[name]] = t
            continue
        _, index, rest = name.split(".", 2)  # blocks.{i}.{rest}
        prefix = f"model.layers.{index}."
        if rest.startswith("ffn."):
            rest = rest.removeprefix("ffn.")
            if rest == "experts.w_up":
                continue  # joined with w_gate below
            if rest == "experts.w_gate":
                up = own[name.replace("w_gate", "w_up")].detach().float()
                state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([t, up], dim=1)
            else:
                state[prefix + _FFN_MAP[rest]] = t * SHARED_GATE_SCALE if rest == "shared.w_down.weight" else t
        else:
            state[prefix + BLOCK_NAMES[rest]] = t
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    d = cfg.d_model
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        if not cfg.norm_affine:  # HF norms always have a weight: an affine-free norm is weight 1
            for norm in ("input_layernorm", "post_attention_layernorm"):
                state[f"{prefix}{norm}.weight"] = torch.ones(d)
        if family == "qwen2_moe":
            state[prefix + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
            if not cfg.moe.shared_expert_hidden:
                state[prefix + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(0, d)
                state[prefix + "mlp.shared_expert.up_proj.weight"] = torch.zeros(0, d)
                state[prefix + "mlp.shared_expert.down_proj.weight"] = torch.zeros(d, 0)
    if not cfg.norm_affine:
        state["model.norm.weight"] = torch.ones(d)
    return hf_config, state


def _hf_moe_config(cfg: ModelConfig, family: str, common: dict):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = cfg.moe
    hidden = moe.expert_hidden or cfg.hidden
    if family == "mixtral":
        return MixtralConfig(**{**common, "intermediate_size": hidden}, num_local_experts=moe.num_experts,
                             num_experts_per_tok=moe.top_k, sliding_window=None, router_jitter_noise=0.0)
    qwen = {"moe_intermediate_size": hidden, "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "use_sliding_window": False}
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, **qwen, attention_bias=False)
    return Qwen2MoeConfig(**common, **qwen, shared_expert_intermediate_size=moe.shared_expert_hidden,
                          qkv_bias=False)


def import_moe(hf_model) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(ModelConfig, depthlab state_dict)`` of a Mixtral / Qwen2-MoE / Qwen3-MoE transformers model."""
    hc = hf_model.config
    family = hc.model_type
    if family == "olmoe":
        raise ModelLoadError("cannot import OLMoE: its QK-norm spans all heads of the projection, depthlab's is per "
                             "head, so no depthlab config computes the same function")
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        raise ModelLoadError(f"cannot import model type '{family}': supported MoE families are mixtral, qwen2_moe "
                             "and qwen3_moe")
    _check_importable(hc, family)
    hf_state = hf_model.state_dict()
    shared_hidden = getattr(hc, "shared_expert_intermediate_size", 0) or 0
    if family == "qwen2_moe" and any(hf_state[f"model.layers.{i}.mlp.shared_expert_gate.weight"].any()
                                     for i in range(hc.num_hidden_layers)):
        raise ModelLoadError("cannot import this Qwen2-MoE: its shared expert is gated by sigmoid(gate·x) with a "
                             "nonzero gate, which depthlab's always-on shared expert cannot express")
    experts = hc.num_local_experts if family == "mixtral" else hc.num_experts
    hidden = hc.intermediate_size if family == "mixtral" else hc.moe_intermediate_size
    theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", getattr(hc, "rope_theta", 10000.0))
    cfg = ModelConfig(vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=hc.num_hidden_layers,
                      n_heads=hc.num_attention_heads, n_kv_heads=hc.num_key_value_heads,
                      seq_len=hc.max_position_embeddings, ffn_hidden=hidden, norm_eps=hc.rms_norm_eps,
                      rope_theta=float(theta), qk_norm=family == "qwen3_moe",
                      tie_embeddings=bool(hc.tie_word_embeddings),
                      moe=MoEConfig(num_experts=experts, top_k=hc.num_experts_per_tok, expert_hidden=hidden,
                                    shared_expert_hidden=shared_hidden,
                                    renormalize=family == "mixtral" or bool(hc.norm_topk_prob)))
    inverse_top = {v: k for k, v in TOP_NAMES.items()}
    inverse_block = {v: k for k, v in BLOCK_NAMES.items()}
    inverse_ffn = {v: "ffn." + k for k, v in _FFN_MAP.items()}
    state = {}
    for name, t in hf_state.items():
        if name in inverse_top:
            state[inverse_top[name]] = t.detach().float().clone()
            continue
        index, rest = name.removeprefix("model.layers.").split(".", 1)
        prefix = f"blocks.{index}."
        if rest == "mlp.experts.gate_up_proj":
            gate, up = t.detach().float().split(hidden, dim=1)
            state[prefix + "ffn.experts.w_gate"], state[prefix + "ffn.experts.w_up"] = gate.clone(), up.clone()
        elif rest == "mlp.shared_expert_gate.weight" or (rest.startswith("mlp.shared_expert.") and not shared_hidden):
            continue  # zero gate (checked above) / zero-width shared expert: nothing to carry over
        elif rest in inverse_ffn:
            scale = SHARED_GATE_SCALE if rest == "mlp.shared_expert.down_proj.weight" else 1.0
            state[prefix + inverse_ffn[rest]] = t.detach().float() / scale
        elif rest in inverse_block:
            state[prefix + inverse_block[rest]] = t.detach().float().clone()
        else:
            raise ModelLoadError(f"cannot import {family}: unexpected parameter {name}")
    return cfg, state


def _check_importable(hc, family: str) -> None:
    """Refuse the family options that depthlab's architecture does not have."""
    problems = []
    if getattr(hc, "attention_bias", False) or getattr(hc, "qkv_bias", False):
        problems.append("biased attention projections")
    window = getattr(hc, "sliding_window", None)
    if window and (family == "mixtral" or getattr(hc, "use_sliding_window", False)):
        problems.append(f"sliding-window attention ({window})")
    if family != "mixtral" and (getattr(hc, "mlp_only_layers", None) or getattr(hc, "decoder_sparse_step", 1) != 1):
        problems.append("dense layers between MoE layers (mlp_only_layers / decoder_sparse_step)")
    if getattr(hc, "hidden_act", "silu") != "silu":
        problems.append(f"activation {hc.hidden_act}")
    if (getattr(hc, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        problems.append("scaled RoPE")
    if problems:
        raise ModelLoadError(f"cannot import this {family} model: {', '.join(problems)} "
                             "(not part of depthlab's architecture)")
