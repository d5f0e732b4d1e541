"""Hugging Face interop: export a depthlab model to a standard architecture, and import it back.

Dense pre-LN models map exactly onto ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM`` when QK-norm is on: Qwen3 normalises
queries and keys per head before RoPE, as depthlab does). MoE models go through `depthlab.model.hf_moe`.
LayerNorm Scaling, post/mix/peri placements have no standard architecture: they are refused rather than silently
exported as something else.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from depthlab import config as cfgmod
from depthlab.config import ModelConfig
from depthlab.errors import AnalysisError, ModelLoadError
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


def export_hf(source, out: str | Path, tokenizer=None, *, overwrite: bool = False,
              analysis: str | Path | None = None) -> Path:
    """Write a standard HF folder (config.json, model.safetensors, tokenizer files, README.md model card) for a run
    folder or a model.

    The config and generation config carry the tokenizer's eos/bos ids (so ``generate`` stops), the tokenizer's
    ``model_max_length`` is the training context, and README.md records the base run, data, training config,
    depthlab version and, when an analysis is given or ``RUN/analysis/results.json`` exists, its summary.
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
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own settings
        tokenizer.model_max_length = model.config.seq_len
        _set_special_tokens(hf, tokenizer)
    card = model_card(model, tokenizer, source if protect else None, analysis)

    def write(tmp: Path) -> None:
        save_pretrained(hf, tokenizer, tmp)
        (tmp / "README.md").write_text(card)

    return write_folder(out, write, overwrite=overwrite, protect=protect)


def _set_special_tokens(hf_model, tokenizer) -> None:
    """eos/bos/pad ids from the tokenizer into the config and generation config. depthlab's data separates documents
    with eos and has no bos, so a missing bos is the eos (what the model saw before every document)."""
    eos = tokenizer.eos_token_id
    ids = {"eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos}
    for target in (hf_model.config, hf_model.generation_config):
        for key, value in ids.items():
            setattr(target, key, value)


def model_card(model: Transformer, tokenizer=None, run: str | Path | None = None,
               analysis: str | Path | None = None) -> str:
    """README.md for an exported model: Hugging Face metadata (YAML front matter), then what it is and how it was
    made — base run and checkpoint, data, parameters, training config, provenance and the analysis summary."""
    import json

    import yaml

    from depthlab import __version__
    from depthlab.model.params import param_counts
    from depthlab.provenance import provenance
    from depthlab.rundir import RunDir

    cfg = model.config
    config = RunDir.of(run).read_config() if run is not None else {"model": cfgmod.to_dict(cfg)}
    data = _data_description(config.get("data", {}))
    if analysis is None and run is not None and (RunDir.of(run).path / "analysis" / "results.json").exists():
        analysis = RunDir.of(run).path / "analysis"
    summary = None
    if analysis is not None:
        path = Path(analysis) / "results.json"
        try:
            results = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            raise AnalysisError(f"{path} is torn or not JSON: rerun the analysis or pass another --analysis") from None
        if not isinstance(results, dict):
            raise AnalysisError(f"{path} is not a depthlab results file (it holds a JSON {type(results).__name__})")
        summary = results.get("summary")
    arch = "Qwen3ForCausalLM" if cfg.qk_norm and not cfg.moe.num_experts else (
        "LlamaForCausalLM" if not cfg.moe.num_experts else "a Hugging Face MoE family")
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["depthlab", "curse-of-depth"],
            "license": "apache-2.0"}
    intro = (f"A decoder-only language model trained with depthlab {__version__} and exported as {arch} (loads "
             "with `AutoModelForCausalLM.from_pretrained` without custom code).")
    shape = (f"L={cfg.n_layers} blocks, d={cfg.d_model}, {cfg.n_heads} heads ({cfg.kv_heads} kv), context "
             f"{cfg.seq_len}, vocabulary {cfg.vocab_size}")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(str(run)).name if run is not None else 'depthlab model'}", "",
             intro, "",
             "| | |", "| --- | --- |",
             f"| base run | `{RunDir.of(run).path}` |" if run is not None else "| base run | (a model object) |",
             f"| checkpoint | `{getattr(model, 'checkpoint_path', None)}` |",
             f"| data | {data} |",
             f"| shape | {shape} |",
             f"| parameters | {param_counts(cfg).summary()} |",
             f"| tokenizer | eos id {getattr(tokenizer, 'eos_token_id', None)}, model_max_length {cfg.seq_len} |", ""]
    if summary:
        lines += ["## Depth analysis (`depthlab analyze`)", "", "```json", json.dumps(summary, indent=1), "```", ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", "",
              "## Provenance", "", "```json", json.dumps(provenance(), indent=1), "```", ""]
    return "\n".join(lines)


def _data_description(data: dict) -> str:
    from depthlab.data import TokenDataset

    path = data.get("path") or ""
    if not path:
        return f"the bundled Shakespeare plays (byte-level BPE, vocabulary {data.get('vocab_size')})"
    try:
        meta = TokenDataset(path).meta
    except Exception:  # noqa: BLE001 — the card names the path even when the data folder is gone
        return f"`{path}`"
    tokens = meta.get("splits", {}).get("train", {}).get("tokens")
    return f"`{path}` ({meta.get('source')}; {tokens:,} training tokens)" if tokens else f"`{path}`"


def save_pretrained(hf_model, tokenizer, folder: Path) -> None:
    """A transformers model (safetensors) and its tokenizer (with its checksum sidecar) into an existing folder."""
    from depthlab.data.tokenizer import save_tokenizer

    hf_model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


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
