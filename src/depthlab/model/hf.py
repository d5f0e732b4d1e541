"""Hugging Face interop: export a depthlab model to a standard architecture, and import it back.

Dense pre-LN models map exactly onto ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM`` when QK-norm is on: Qwen3 normalises
queries and keys per head before RoPE, as depthlab does). MoE models go through `depthlab.model.hf_moe`.
LayerNorm Scaling, post/mix/peri placements have no standard architecture: they are refused rather than silently
exported as something else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from depthlab import config as cfgmod
from depthlab.config import ModelConfig
from depthlab.errors import ModelLoadError
from depthlab.model.hf_common import BLOCK_NAMES, TOP_NAMES, common_config
from depthlab.model.hf_moe import export_moe_state, import_moe
from depthlab.model.transformer import Transformer


def exportable(cfg: ModelConfig) -> str | None:
    """Why `cfg` has no standard HF architecture, or None when it has one."""
    if cfg.lns:
        return "LayerNorm Scaling (model.lns) has no standard Hugging Face architecture"
    if cfg.norm != "pre":
        return f"norm placement '{cfg.norm}' has no standard Hugging Face architecture (only 'pre')"
    return None


def _to_hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # blocks.{i}.{rest}
    return f"model.layers.{index}.{BLOCK_NAMES[rest]}"


def _hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig, Qwen3Config

    common = common_config(cfg)
    if cfg.qk_norm:
        return Qwen3Config(**common, attention_bias=False, use_sliding_window=False)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def to_hf(model: Transformer):
    """The equivalent transformers model (fp32), sharing no storage with `model`."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    reason = exportable(cfg)
    if reason:
        raise ModelLoadError(f"cannot export: {reason}")
    if cfg.moe.num_experts:
        hf_config, state = export_moe_state(model, cfg)
    else:
        hf_config = _hf_config(cfg)
        state = {_to_hf_name(k): v.detach().float().clone() for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        if not cfg.norm_affine:  # HF norms always have a weight: an affine-free norm is weight 1
            for i in range(cfg.n_layers):
                for n in ("input_layernorm", "post_attention_layernorm"):
                    state[f"model.layers.{i}.{n}.weight"] = torch.ones(cfg.d_model)
            state["model.norm.weight"] = torch.ones(cfg.d_model)
            if cfg.qk_norm:
                for i in range(cfg.n_layers):
                    for n in ("q_norm", "k_norm"):
                        state[f"model.layers.{i}.self_attn.{n}.weight"] = torch.ones(cfg.head_dim)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"export mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(source, out: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write a standard HF folder (config.json, model.safetensors, tokenizer files) for a run folder or a model.

    `out` must be new or empty unless `overwrite`; it is written beside itself and swapped in atomically, and is
    never the source run or a folder holding it (`depthlab.fileio.write_folder`).
    """
    from depthlab.fileio import check_folder_target, write_folder
    from depthlab.model.io import load_depthlab

    protect = [source] if isinstance(source, (str, Path)) else []
    check_folder_target(out, overwrite=overwrite, protect=protect)
    if isinstance(source, (str, Path)):
        model, tokenizer = load_depthlab(source)
    else:
        model = source
    hf = to_hf(model)
    return write_folder(out, lambda tmp: save_pretrained(hf, tokenizer, tmp), overwrite=overwrite, protect=protect)


def save_pretrained(hf_model, tokenizer, folder: Path) -> None:
    """A transformers model (safetensors) and its tokenizer into an existing folder."""
    hf_model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def from_hf(hf_model) -> Transformer:
    """A depthlab Transformer equal to a Llama/Qwen3 (dense) or supported MoE transformers model."""
    hc = hf_model.config
    model_type = hc.model_type
    if model_type not in ("llama", "qwen3"):
        cfg, state = import_moe(hf_model)
    else:
        if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False):
            raise ModelLoadError("cannot import: biased projections are not part of depthlab's architecture")
        theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", getattr(hc, "rope_theta", 10000.0))
        cfg = ModelConfig(vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=hc.num_hidden_layers,
                          n_heads=hc.num_attention_heads, n_kv_heads=hc.num_key_value_heads,
                          seq_len=hc.max_position_embeddings, ffn_hidden=hc.intermediate_size,
                          norm_eps=hc.rms_norm_eps, rope_theta=float(theta), qk_norm=model_type == "qwen3",
                          tie_embeddings=bool(hc.tie_word_embeddings))
        inverse = {_to_hf_name(k): k for k in _state_names(cfg)}
        state = {inverse[k]: v for k, v in hf_model.state_dict().items() if k in inverse}
    cfgmod.validate(cfgmod.Config(model=cfg))
    model = Transformer(cfg)
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.eval()


def _state_names(cfg: ModelConfig) -> list[str]:
    """State-dict keys of a model with this config, without allocating it."""
    with torch.device("meta"):
        return list(Transformer(cfg).state_dict())
