"""`ModelView`: what depthlab needs to know about a causal LM's structure — **the one place a model family is taught**.

Every tool that asks a structural question about a model (analysis, eval, doctor, prune) asks it here: where the
blocks, final norm, LM head and embedding are; which sub-module's output is the attention / FFN branch that is
added to the residual stream; where the MoE routers are; the context length, heads, KV heads and experts; whether
it is depthlab's own `Transformer` (``native``) or a Hugging Face model; and what belongs to each *position* of the
stack rather than to the block weights there.

**Blocks, norm, head** are found by the module paths in ``BLOCK_PATHS`` / ``FINAL_NORM_PATHS``; a family with a new
layout is taught by adding its paths there. ``final(h)`` is the logits from the pre-final-norm stream, including the
output logic some families apply after the head (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma-2/3's
``final_logit_softcapping``); the engine checks once that it reproduces the model's own logits.

**Branches.** Block l maps x = h_l to y = h_{l+1}; for the usual sequential or parallel residual block
``y = x + α·a + β·f`` where a and f are the outputs of the attention and FFN *sub-layers* after any norm the block
applies to them (Peri-LN, Gemma-2/3, OLMo-2 post-sub-layer norms) and α = β = 1 except for families that scale
their residual branches (Granite's ``residual_multiplier``). The sub-layers are found by name (``ATTN_NAMES``,
``FFN_NAMES``, with a class-name fallback); the post-sub-layer norm is found *by data flow*, because names do not
say it (Llama's ``post_attention_layernorm`` normalises the FFN input, Gemma-2's the attention output): one probe
forward of a few tokens records every child module's input and output, and a child called once whose input is
exactly the branch output, and whose output differs from it, extends the branch. The same probe then checks
``y − x = α·a + β·f`` (α, β fitted by least squares when 1 does not fit) up to the rounding of the residual additions.
Blocks where it does not hold (post-LN blocks, branches that add the residual themselves as Bloom's do) report their
branches as unavailable with a reason: stream metrics still run, branch columns become null. depthlab's own blocks
need no probe: their branch outputs are ``attn``/``ffn`` or, under Peri-LN, ``attn_out_norm``/``ffn_out_norm``, and
they hold under post-LN and Mix-LN too.

**Positions.** A block is its weights; everything else about the module at position l — depthlab's LayerNorm-Scaling
factor 1/sqrt(l+1) and norm placement (Mix-LN), Hugging Face's ``layer_idx`` (RoPE / KV-cache index), sliding-window
or attention type — belongs to the position. ``run(position, ..., block=b)`` therefore runs the *module* at
`position` with block b's parameters and persistent buffers (``torch.func.functional_call``), so a swapped block
never carries its own position's metadata along. ``position(l)`` describes that metadata.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from depthlab.errors import AnalysisError
from depthlab.model.dispatch import execution_device, is_dispatched, named_tensors, offload_paused
from depthlab.model.transformer import Transformer

BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks",
               "blocks")
"""Where the block list lives, tried in order (Llama-likes, GPT-2/Falcon/Bloom, GPT-NeoX, OPT, MPT, depthlab)."""
FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                    "model.final_layernorm", "transformer.norm_f", "norm")
"""Where the final norm lives, tried in order."""
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
"""Child names of the attention sub-layer (else: the first child whose class name ends in "Attention")."""
FFN_NAMES = ("mlp", "ffn", "feed_forward", "block_sparse_moe", "moe", "fc2")
"""Child names of the FFN / MoE sub-layer; ``fc2`` is the output projection of OPT-style blocks that hold their MLP
inline (else: the first child whose class name contains MLP, MoE or FeedForward)."""
ROUTER_NAMES = ("router", "gate")
"""Child names of an MoE router inside the FFN sub-layer."""
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_len", "max_seq_len", "max_sequence_length")
"""Config keys holding the context length (depthlab's ``seq_len`` included)."""
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k")
BRANCHES = ("attn", "ffn")
PROBE_TOKENS = 8


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _config_int(cfg, keys: Sequence[str]) -> int | None:
    return next((v for k in keys if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)


def is_native(model) -> bool:
    """Whether `model` is depthlab's own Transformer (the one test of "is this a depthlab model?")."""
    return isinstance(model, Transformer)


def is_causal_lm(model: nn.Module) -> bool:
    """True for depthlab's Transformer and for Hugging Face causal-LM classes."""
    if is_native(model):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, tuple | list) else (value,))
    return type(model).__name__ in names


@dataclass(frozen=True)
class Position:
    """What belongs to position l of the stack, whichever block's weights run there."""

    layer: int
    """The index the module at l uses for RoPE tables / the KV cache (HF ``layer_idx``), i.e. l itself."""
    lns_factor: float
    """depthlab's LayerNorm-Scaling factor 1/sqrt(l+1) multiplying the branch inputs (1 without LNS and for HF)."""
    placement: str | None
    """depthlab's norm placement here: pre / post / peri (Mix-LN resolved per position); None for HF models."""
    attention_type: str | None
    """The HF ``config.layer_types[l]`` entry (e.g. "sliding_attention"), where the family has one."""


@dataclass(frozen=True)
class Branch:
    """The output of `module`, times `scale`, is the branch the block adds to the stream."""

    module: nn.Module
    scale: float = 1.0


class ModelView:
    """Structural view of a causal LM (see the module docstring); cheap to build, the branch probe runs lazily."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise AnalysisError(f"expected a torch model, got {type(model).__name__}")
        if not is_causal_lm(model):
            raise AnalysisError(f"{type(model).__name__} is not a causal language model (depthlab analyses "
                                "decoder-only LMs loaded with AutoModelForCausalLM or depthlab.load_model)")
        self.model = model
        self.native = is_native(model)
        """depthlab's own Transformer (config: ModelConfig) rather than a Hugging Face model."""
        self.config = getattr(model, "config", None)
        self.model_type = "depthlab" if self.native else getattr(self.config, "model_type", None) or "unknown"
        how_to = "add its paths to BLOCK_PATHS / FINAL_NORM_PATHS in depthlab/model/view.py"
        self.blocks = next((m for p in BLOCK_PATHS if isinstance(m := _get(model, p), nn.ModuleList)), None)
        if self.blocks is None or len(self.blocks) == 0:
            raise AnalysisError(f"cannot locate the transformer blocks of {type(model).__name__} "
                                f"(model_type {self.model_type!r}); to support it, {how_to}")
        self.final_norm = next((m for p in FINAL_NORM_PATHS if (m := _get(model, p)) is not None), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if head is not None else _get(model, "lm_head")
        if self.final_norm is None or self.head is None:
            raise AnalysisError(f"cannot locate the final norm / LM head of {type(model).__name__}; to support "
                                f"it, {how_to}")
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.embedding = embed if embed is not None else _get(model, "embed")
        """The token embedding (h_0 is block 0's input, which may add position embeddings or a scale to it)."""
        self.n_layers = len(self.blocks)
        self.d_model = self.head.weight.shape[1]
        self.vocab_size = self.head.weight.shape[0]
        cfg = self.config
        self._logit_scale, self._softcap = 1.0, None
        if self.native:
            self.context: int | None = cfg.seq_len
            self.n_heads: int | None = cfg.n_heads
            self.n_kv_heads: int | None = cfg.kv_heads
            self.num_experts: int | None = cfg.moe.num_experts or None
            self.top_k: int | None = cfg.moe.top_k if self.num_experts else None
        else:
            self.context = _config_int(cfg, CONTEXT_KEYS)
            self.n_heads = _config_int(cfg, ("num_attention_heads", "n_head"))
            single_kv = getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False)
            self.n_kv_heads = 1 if single_kv else _config_int(cfg, KV_HEAD_KEYS) or self.n_heads
            self.num_experts = _config_int(cfg, EXPERT_KEYS)
            self.top_k = _config_int(cfg, TOP_K_KEYS) if self.num_experts else None
            # Output logic after the LM head, from the config (1 / None where the family has none).
            self._logit_scale = (getattr(cfg, "logit_scale", None) or 1.0) / (getattr(cfg, "logits_scaling", None) or 1.0)
            self._softcap = getattr(cfg, "final_logit_softcapping", None)
        params = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"use_cache": False} if "use_cache" in params else {}
        """Keyword arguments for a plain scoring forward (no KV cache)."""
        self._branches: list[dict[str, Branch | None]] | None = None
        self._unavailable: list[str | None] = [None] * self.n_layers
        self._weights: dict[int, dict[str, torch.Tensor]] = {}
        self._layouts: dict[int, tuple] = {}

    # ---------------------------------------------------------------------------------------------------------- #
    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the pre-final-norm stream (final norm, LM head and the family's output scaling / softcap)."""
        logits = self.head(self.final_norm(h))
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.to(h.device)  # a no-op unless accelerate placed the head on another device

    def position(self, layer: int) -> Position:
        block = self.blocks[layer]
        if self.native:
            return Position(layer, block.scale, block.placement, None)
        types = getattr(self.config, "layer_types", None)
        kind = types[layer] if isinstance(types, list | tuple) and len(types) == self.n_layers else None
        return Position(layer, 1.0, None, kind)

    def sublayer(self, layer: int, name: str) -> nn.Module | None:
        """The attention ("attn") or FFN/MoE ("ffn") sub-layer of block `layer` (before any post-sub-layer norm)."""
        block = self.blocks[layer]
        if self.native:
            return block.attn if name == "attn" else block.ffn
        names = ATTN_NAMES if name == "attn" else FFN_NAMES
        found = next((m for n in names if (m := getattr(block, n, None)) is not None and isinstance(m, nn.Module)),
                     None)
        if found is not None:
            return found
        for child in block.children():
            cls = type(child).__name__
            if (cls.endswith("Attention") if name == "attn" else any(k in cls for k in ("MLP", "MoE", "FeedForward"))):
                return child
        return None

    def router(self, layer: int) -> nn.Module | None:
        """The MoE router of block `layer`, or None for a dense FFN."""
        ffn = self.sublayer(layer, "ffn")
        if ffn is None:
            return None
        return next((m for n in ROUTER_NAMES if (m := _get(ffn, n)) is not None), None)

    def branch(self, layer: int, name: str) -> Branch | None:
        """The module whose output (times its scale) is the `name` branch added to the stream; None if unavailable."""
        if self._branches is None:
            self._branches = self._locate_branches()
        return self._branches[layer][name]

    def branch_unavailable(self, layer: int) -> str | None:
        """Why block `layer`'s branches cannot be measured, or None when they can."""
        self.branch(layer, "attn")
        return self._unavailable[layer]

    # ---------------------------------------------------------------------------------------------------------- #
    def weights(self, block: int) -> dict[str, torch.Tensor]:
        """Block `block`'s parameters and persistent buffers: what moves when a block moves."""
        if block not in self._weights:
            self._weights[block] = self.blocks[block].state_dict(keep_vars=True)
            self._layouts[block] = tuple((k, tuple(v.shape), v.dtype) for k, v in self._weights[block].items())
        return self._weights[block]

    def swappable(self, a: int, b: int) -> bool:
        """Whether blocks a and b have the same weight layout (so each can run at the other's position)."""
        self.weights(a), self.weights(b)
        return self._layouts[a] == self._layouts[b]

    def run(self, position: int, h: torch.Tensor, args: tuple, kwargs: dict, *, block: int | None = None):
        """Run block `block`'s weights (default: the position's own) at `position`, with everything else — LNS factor,
        norm placement, layer index, attention type, the call's masks and RoPE tables — of the position."""
        module = self.blocks[position]
        if block is None or block == position:
            return module(h, *args, **kwargs)
        if not self.swappable(position, block):
            raise AnalysisError(f"blocks {block} and {position} have different weight layouts; block {block} "
                                f"cannot run at position {position}")
        if not (is_dispatched(module) or is_dispatched(self.blocks[block])):
            return torch.func.functional_call(module, self.weights(block), (h, *args), kwargs, tie_weights=False)
        # Placed by accelerate: block's weights (read from its offload map if offloaded) go to the position's
        # device, and the position's hooks move the inputs without loading the position's own weights over them.
        device = execution_device(module)
        weights = {k: v.to(device) for k, v in named_tensors(self.blocks[block])}
        with offload_paused(module):
            return torch.func.functional_call(module, weights, (h, *args), kwargs, tie_weights=False)

    # ---------------------------------------------------------------------------------------------------------- #
    def _locate_branches(self) -> list[dict[str, Branch | None]]:
        if self.native:
            out = []
            for block in self.blocks:
                peri = block.placement == "peri"
                out.append({"attn": Branch(block.attn_out_norm if peri else block.attn),
                            "ffn": Branch(block.ffn_out_norm if peri else block.ffn)})
            return out
        subs = [{n: self.sublayer(l, n) for n in BRANCHES} for l in range(self.n_layers)]
        records = self._probe()
        out = []
        for l, (x, y, calls) in enumerate(records):
            found: dict[str, Branch | None] = {"attn": None, "ffn": None}
            missing = [n for n in BRANCHES if subs[l][n] is None]
            if missing:
                self._unavailable[l] = (f"no {' / '.join(missing)} sub-layer found in {type(self.blocks[l]).__name__} "
                                        "(see ATTN_NAMES / FFN_NAMES in depthlab/model/view.py)")
                out.append(found)
                continue
            ends = {n: _extend(calls, subs[l][n], exclude=subs[l].values()) for n in BRANCHES}
            if any(e is None for e in ends.values()):
                self._unavailable[l] = "a branch sub-layer did not run exactly once in the probe forward"
                out.append(found)
                continue
            scales = _fit_scales(x, y, [calls[m][0][2] for m in ends.values()])
            if scales is None:
                self._unavailable[l] = ("the block's update is not a fixed combination of its attention and FFN "
                                        "outputs (post-LN, or a branch adds the residual itself)")
            else:
                found = {n: Branch(ends[n], s) for n, s in zip(BRANCHES, scales)}
            out.append(found)
        return out

    @torch.no_grad()
    def _probe(self):
        """One forward of a few tokens recording each block's input/output and each child's calls (cloned, as some
        families add into a branch output in place)."""
        records = [[None, None, {}] for _ in range(self.n_layers)]
        order = [0]

        def child_hook(layer):
            def hook(module, args, kwargs, out):
                inp = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
                o = _first_tensor(out)
                order[0] += 1
                records[layer][2].setdefault(module, []).append(
                    (order[0], None if inp is None else inp.clone(), None if o is None else o.clone()))
            return hook

        def block_pre(layer):
            def hook(module, args, kwargs):
                records[layer][0] = (args[0] if args else kwargs["hidden_states"]).clone()
            return hook

        def block_post(layer):
            def hook(module, args, kwargs, out):
                records[layer][1] = _first_tensor(out).clone()
            return hook

        handles = []
        for l, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(block_pre(l), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post(l), with_kwargs=True))
            handles += [c.register_forward_hook(child_hook(l), with_kwargs=True) for c in block.children()]
        device = execution_device(self.embedding) if self.embedding is not None else execution_device(self.model)
        T = min(PROBE_TOKENS, self.context or PROBE_TOKENS)
        ids = (torch.arange(T, device=device) * 7 + 3).remainder(self.vocab_size)[None]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(ids, **self.forward_kwargs)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return records


def _extend(calls: dict, start: nn.Module, exclude) -> nn.Module | None:
    """Follow the branch output of `start` through children that transform exactly it (post-sub-layer norms)."""
    if len(calls.get(start, ())) != 1:
        return None
    end = start
    order, _, value = calls[start][0]
    while True:
        nxt = next((m for m, c in calls.items() if m is not end and m not in exclude and len(c) == 1
                    and c[0][0] > order and c[0][1] is not None and c[0][2] is not None
                    and c[0][1].shape == value.shape and torch.equal(c[0][1], value)
                    and not torch.equal(c[0][2], c[0][1])), None)
        if nxt is None:
            return end
        end = nxt
        order, _, value = calls[nxt][0]


def _fit_scales(x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor]) -> list[float] | None:
    """α, β with y − x = α·a + β·f up to rounding (1, 1 whenever that fits), or None when no such pair fits."""
    update = (y.double() - x.double()).flatten()
    A = torch.stack([o.double().flatten() for o in outs], 1)
    eps = torch.finfo(y.dtype).eps
    # The residual additions round y at every step: allow a few ulps of the stream on top of a relative tolerance.
    tol = 1e-4 * update.norm() + 4 * eps * (x.double().norm() + y.double().norm())
    for coef in (torch.ones(2, dtype=torch.float64), torch.linalg.lstsq(A, update[:, None]).solution[:, 0]):
        if (update - A @ coef).norm() <= tol and all(math.isfinite(c) for c in coef.tolist()):
            return coef.tolist()
    return None
