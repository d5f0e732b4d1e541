"""`depthlab prune`: remove whole blocks from a model, keep it a valid model, and measure what it cost.

Which blocks: a list (``"3,5-7"``), or ``auto`` with ``n`` blocks chosen on a calibration sample by

* ``usefulness``: the n blocks whose linear replacement raises the loss least (lowest loss ratio, SPEC §5.4);
* ``angular``: Gromov et al.'s rule, the n consecutive blocks whose input and output are closest in angular
  distance (SPEC §5.2).

Keeping the model valid is the subtle part. Hugging Face models carry each block's position in the cache:
every attention's ``layer_idx`` indexes the KV cache, and ``config.num_hidden_layers`` / ``config.layer_types`` size
it, so all of them are renumbered — otherwise generation with a cache silently mixes layers. depthlab models are
rebuilt with fewer layers; LayerNorm Scaling multiplies block l's branch input by 1/sqrt(l+1) from its *position*,
so a block moved from depth i to j would change its function: the factor ratio sqrt(j+1)/sqrt(i+1) is folded into
the weights that read the branch input (q/k/v, gate/up, router), which keeps each block's original factor and
survives saving. Mix-LN keeps its post-LN prefix by adjusting ``mix_fraction``.

The pruned model is saved as a standard Hugging Face folder (safetensors + tokenizer); a depthlab model is exported
with `depthlab.model.hf.export_hf` when it has a standard architecture, else saved as a depthlab run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthlab.analysis import angular_distance, usefulness
from depthlab.analysis.replacement import require_reliable
from depthlab.errors import DepthlabError
from depthlab.fileio import check_folder_target, dumps_json, write_folder
from depthlab.model.view import ModelView
from depthlab.rundir import RunDir

PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
"""Hugging Face config lists with one entry per layer, subset along with the blocks."""
LAYER_INDEX_CONFIG = ("mlp_only_layers",)
"""Hugging Face config lists of layer indices, renumbered to the kept blocks."""
UNITS = ("block", "attn", "mlp")
"""What `prune` removes: whole blocks, or the attention / MLP (MoE) sub-layer of each chosen block."""


class PruneError(DepthlabError):
    """The blocks to drop are malformed, out of range, or would leave no block."""


@dataclass
class Selection:
    dropped: list[int]
    method: str
    """"list", "usefulness" or "angular"."""
    scores: list[float] | None = None
    """Per-block loss ratios (usefulness) or the chosen window's angular distance (angular)."""


def parse_blocks(spec: str, n_layers: int) -> list[int]:
    """'3,5-7' → [3, 5, 6, 7]; refuses malformed items, out-of-range indices and dropping every block."""
    blocks: set[int] = set()
    for item in str(spec).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match:
            raise PruneError(f"malformed block list {spec!r}: expected indices and ranges like '3,5-7'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi:
            raise PruneError(f"malformed range {item.strip()!r} in {spec!r}: start after end")
        if hi >= n_layers:
            raise PruneError(f"block {hi} is out of range: the model has blocks 0..{n_layers - 1}")
        blocks.update(range(lo, hi + 1))
    return _checked(sorted(blocks), n_layers)


def _checked(dropped: list[int], n_layers: int) -> list[int]:
    if any(not 0 <= b < n_layers for b in dropped):
        raise PruneError(f"blocks {dropped} are out of range: the model has blocks 0..{n_layers - 1}")
    if len(dropped) >= n_layers:
        raise PruneError(f"cannot drop all {n_layers} blocks: at least one must remain")
    if not dropped:
        raise PruneError("no blocks to drop")
    return sorted(dropped)


def select_blocks(model, drop, *, input_ids: torch.Tensor | None = None, n: int | None = None,
                  method: str = "usefulness", fit_ids: torch.Tensor | None = None,
                  progress: bool = False) -> Selection:
    """Resolve `drop` ("auto", a list string like "3,5-7", or a list of ints) to the blocks to remove.

    With usefulness the maps are fitted on `fit_ids` (None cross-fits `input_ids`); unreliable scores (too few fit
    tokens per map) are refused rather than used to choose."""
    L = ModelView(model).n_layers
    if drop != "auto":
        if isinstance(drop, str):
            return Selection(parse_blocks(drop, L), "list")
        return Selection(_checked(sorted({int(b) for b in drop}), L), "list")
    if method not in ("usefulness", "angular"):
        raise PruneError(f"unknown selection method {method!r}; choose usefulness or angular")
    n = max(1, L // 4) if n is None else n
    if not 1 <= n < L:
        raise PruneError(f"--n must be between 1 and {L - 1} for a {L}-block model, got {n}")
    if input_ids is None:
        raise PruneError("drop='auto' needs a calibration sample (input_ids)")
    if method == "usefulness":
        scores = usefulness(model, input_ids, fit_ids=fit_ids, bootstrap=0, progress=progress)
        require_reliable(scores, "prune --drop auto")
        ratios = scores.loss_ratios
        return Selection(sorted(sorted(range(L), key=ratios.__getitem__)[:n]), method, ratios)
    window = angular_distance(model, input_ids, progress=progress).best_window(n)
    return Selection(window["blocks"], method, [window["distance"]])


def select_branches(model, drop, unit: str, *, input_ids: torch.Tensor | None = None, n: int | None = None,
                    method: str = "usefulness", progress: bool = False) -> Selection:
    """Resolve `drop` to the blocks whose `unit` ("attn" | "mlp") sub-layer is removed; ``auto`` takes the n blocks
    whose sub-layer removal raises the loss least (`depthlab.analysis.branches`)."""
    L = ModelView(model).n_layers
    if drop != "auto":
        chosen = parse_blocks(drop, L) if isinstance(drop, str) else _checked(sorted({int(b) for b in drop}), L)
        return Selection(chosen, "list")
    if method != "usefulness":
        raise PruneError(f"--method {method} selects whole blocks; with --unit {unit}, --drop auto ranks the "
                         "sub-layers by the loss ratio of removing each")
    n = max(1, L // 4) if n is None else n
    if not 1 <= n < L:
        raise PruneError(f"--n must be between 1 and {L - 1} for a {L}-block model, got {n}")
    if input_ids is None:
        raise PruneError("drop='auto' needs a calibration sample (input_ids)")
    from depthlab.analysis.branches import branch_effects

    effects = branch_effects(model, input_ids, progress=progress)
    ratios = effects.attn_removed if unit == "attn" else effects.ffn_removed
    return Selection(sorted(sorted(range(L), key=ratios.__getitem__)[:n]), "removal", ratios)


def zero_branches(model: nn.Module, unit: str, layers: list[int]) -> nn.Module:
    """A copy of `model` whose `unit` sub-layers ("attn" | "mlp", MoE included) in `layers` output exactly zero.

    Every parameter of the sub-layer is zeroed (an attention with zero q/k/v/o weights and biases outputs 0, an MLP or
    MoE with zero weights outputs 0), and so is any norm the block applies to the sub-layer's output (OLMo-2,
    Peri-LN), so the saved model is a standard one that plain `transformers` loads. The weights stay in the file:
    the model is no smaller and runs no faster. Hugging Face configs record it as ``depthlab_zeroed``.
    """
    pruned = copy.deepcopy(model)
    view = ModelView(pruned)
    name = "attn" if unit == "attn" else "ffn"
    with torch.no_grad():
        for l in layers:
            sub = view.sublayer(l, name)
            if sub is None:
                raise PruneError(f"block {l} ({type(view.blocks[l]).__name__}) has no {unit} sub-layer to remove")
            branch = view.branch(l, name)
            for module in {sub, branch.module} if branch is not None else {sub}:
                for p in module.parameters():
                    p.zero_()
    if not view.native:
        zeroed = dict(getattr(pruned.config, "depthlab_zeroed", None) or {})
        zeroed[unit] = sorted(set(zeroed.get(unit, [])) | set(layers))
        pruned.config.depthlab_zeroed = zeroed
    return pruned.eval()


def prune(model, drop, *, unit: str = "block", input_ids: torch.Tensor | None = None, n: int | None = None,
          method: str = "usefulness", fit_ids: torch.Tensor | None = None,
          progress: bool = False) -> tuple[nn.Module, Selection]:
    """A copy of `model` without the dropped blocks (see the module docstring) — or, with `unit` "attn" | "mlp",
    with those blocks' attention / MLP sub-layers zeroed (`zero_branches`) — and how they were chosen.

    The original model is left untouched. Works for depthlab Transformers and Hugging Face causal LMs.
    """
    if unit not in UNITS:
        raise PruneError(f"unknown unit {unit!r}; choose {', '.join(UNITS)}")
    if unit != "block":
        selection = select_branches(model, drop, unit, input_ids=input_ids, n=n, method=method, progress=progress)
        return zero_branches(model, unit, selection.dropped), selection
    selection = select_blocks(model, drop, input_ids=input_ids, n=n, method=method, fit_ids=fit_ids,
                              progress=progress)
    view = ModelView(model)
    kept = [l for l in range(view.n_layers) if l not in selection.dropped]
    if view.native:
        return _prune_depthlab(model, kept), selection
    return _prune_hf(model, kept), selection


def _prune_hf(model: nn.Module, kept: list[int]) -> nn.Module:
    pruned = copy.deepcopy(model)
    blocks = ModelView(pruned).blocks
    L = len(blocks)
    survivors = [blocks[i] for i in kept]
    for i in reversed(range(L)):
        del blocks[i]
    blocks.extend(survivors)
    for j, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    cfg = pruned.config
    for name in PER_LAYER_CONFIG:
        value = getattr(cfg, name, None)
        if isinstance(value, list | tuple) and len(value) == L:
            setattr(cfg, name, [value[i] for i in kept])
    for name in LAYER_INDEX_CONFIG:
        value = getattr(cfg, name, None)
        if isinstance(value, list | tuple):
            setattr(cfg, name, [j for j, i in enumerate(kept) if i in value])
    cfg.num_hidden_layers = len(kept)
    return pruned


def _input_weights(block: nn.Module) -> list[torch.Tensor]:
    """The weights of a depthlab block that read its branch inputs (where a LayerNorm-Scaling factor can fold in)."""
    attn, ffn = block.attn, block.ffn
    weights = [attn.wq.weight, attn.wk.weight, attn.wv.weight]
    if hasattr(ffn, "router"):  # MoE
        weights += [ffn.router.weight, ffn.experts.w_gate, ffn.experts.w_up]
        if ffn.shared is not None:
            weights += [ffn.shared.w_gate.weight, ffn.shared.w_up.weight]
    else:
        weights += [ffn.w_gate.weight, ffn.w_up.weight]
    return weights


def _prune_depthlab(model: nn.Module, kept: list[int]) -> nn.Module:
    from depthlab.model.transformer import Transformer, block_placement

    cfg = model.config
    changes: dict = {"n_layers": len(kept)}
    if cfg.norm == "mix":  # keep each block's placement: the post-LN blocks stay a prefix of the kept ones
        n_post = sum(block_placement(cfg, i) == "post" for i in kept)
        if n_post in (0, len(kept)):
            changes["norm"] = "post" if n_post else "pre"
        else:
            changes["mix_fraction"] = (n_post + 0.5) / len(kept)
    new_cfg = dataclasses.replace(cfg, **changes)
    pruned = Transformer(new_cfg).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            if int(index) in kept:
                state[f"blocks.{kept.index(int(index))}.{rest}"] = tensor
        else:
            state[name] = tensor
    pruned.load_state_dict(state)
    if cfg.lns:
        with torch.no_grad():
            for j, i in enumerate(kept):
                ratio = ((j + 1) / (i + 1)) ** 0.5  # (1/sqrt(i+1)) / (1/sqrt(j+1))
                for w in _input_weights(pruned.blocks[j]):
                    w.mul_(ratio)
    return pruned.eval()


def save_format(model: nn.Module) -> str:
    """How `save_pruned` saves `model`: "hf" (a standard folder) or "depthlab" (a run folder, for depthlab models
    without a standard architecture)."""
    from depthlab.model.hf import exportable

    return "depthlab" if ModelView(model).native and exportable(model.config) is not None else "hf"


def save_pruned(model: nn.Module, tokenizer, out: str | Path, source_config: dict | None = None, *,
                files: dict[str, str] | None = None, overwrite: bool = False, protect=()) -> str:
    """Save a pruned model (plus text `files`) as one folder `out`, atomically; returns `save_format(model)`.

    `out` must be new or empty unless `overwrite`, and is never a folder holding a `protect` path
    (`depthlab.fileio.write_folder`).
    """
    from depthlab.model.hf import save_pretrained, to_hf

    kind = save_format(model)

    def write(folder: Path) -> None:
        if kind == "depthlab":
            _save_depthlab_run(model, tokenizer, folder, source_config)
        else:
            save_pretrained(to_hf(model) if ModelView(model).native else model, tokenizer, folder)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)

    write_folder(out, write, overwrite=overwrite, protect=protect)
    return kind


def _save_depthlab_run(model, tokenizer, folder: Path, source_config: dict | None) -> None:
    """A depthlab run folder (config.yaml, tokenizer.json, one checkpoint) that `load_model` opens."""
    import yaml

    from depthlab import checkpoint as ckpt
    from depthlab import config as cfgmod
    from depthlab.data.tokenizer import save_tokenizer

    run = RunDir(folder)
    config = cfgmod.from_dict(source_config) if source_config else cfgmod.Config()
    config.model = model.config
    run.config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    ckpt.save_checkpoint(run.checkpoints_dir, 0, ckpt.model_state(model), {}, keep_last=1)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


def heldout_nll(model, input_ids: torch.Tensor, micro_batch_size: int = 8) -> float:
    """Mean next-token NLL over `input_ids` [N, T] (all windows full, so it is a plain token mean)."""
    from depthlab.eval.scorer import forward_logits

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(input_ids), micro_batch_size):
            ids = input_ids[i:i + micro_batch_size].to(device)
            logits = forward_logits(model, ids)[:, :-1].float()
            total += nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                 reduction="sum").double().item()
            count += ids[:, 1:].numel()
    return total / count


def _measure(model, tokenizer, eval_ids, tasks, limit) -> dict:
    import math

    nll = heldout_nll(model, eval_ids)
    row = {"nll": nll, "perplexity": math.exp(nll), "tokens": int(eval_ids[:, 1:].numel())}
    if tasks:
        from depthlab.eval import evaluate

        res = evaluate(model, tokenizer, tasks, limit=limit)
        row["tasks"] = {t: {k: v for k, v in r.items() if k.startswith(("acc", "acc_norm"))}
                        for t, r in res["results"].items() if t not in res["groups"]}  # lm-eval lists groups too
        row["average_acc"] = res["groups"]["average"].get("acc,none")
    return row


def prune_model(model: str | Path, drop, out: str | Path, *, n: int | None = None, method: str = "usefulness",
                tasks: str | None = None, limit: int | None = None, num_samples: int = 8, seq_len: int = 128,
                eval_samples: int = 8, seed: int = 0, data=None, dtype: str = "auto", device: str = "cpu",
                progress: bool = False, overwrite: bool = False, unit: str = "block") -> dict:
    """What `depthlab prune` does: load, choose, prune, measure before/after, save; returns the report.

    Calibration (for drop="auto") and perplexity use disjoint windows of one seeded held-out sample: the first
    `num_samples` windows choose the blocks, the next `eval_samples` measure perplexity; the usefulness maps are
    fitted on a further disjoint sample of 32·(d+1) tokens. `tasks` (comma list)
    adds zero-shot accuracy on the first `limit` examples of each task. Selection and measurements run in `dtype`;
    the saved model keeps the source's stored precision (a bf16 computation never turns fp32 weights into bf16).
    Writes `out/prune_report.json`. `out` must be new or empty unless `overwrite` (checked before any work), and is
    never the source model's folder.
    """
    from depthlab.analysis.defaults import default_fit_samples
    from depthlab.analysis.engine import validate_ids
    from depthlab.data import calibration_samples
    from depthlab.loading import load_model
    from depthlab.precision import dtype_name, resolve_dtype
    from depthlab.provenance import provenance

    if eval_samples < 1:
        raise PruneError(f"eval_samples must be >= 1, got {eval_samples}")
    if unit not in UNITS:
        raise PruneError(f"unknown unit {unit!r}; choose {', '.join(UNITS)}")
    protect = [model] if Path(str(model)).exists() else []
    check_folder_target(out, overwrite=overwrite, protect=protect)
    source, tokenizer = load_model(model, device=device)  # its stored precision: what the pruned copy is saved in
    compute = resolve_dtype(dtype, device)
    stored = next(source.parameters()).dtype
    net = source if compute == stored else copy.deepcopy(source).to(compute)
    fitting = drop == "auto" and unit == "block" and method == "usefulness"
    fit_samples = default_fit_samples(ModelView(net).d_model, seq_len) if fitting else 0
    ids, fit_ids, sample = calibration_samples(tokenizer, data, num_samples + eval_samples, seq_len, fit_samples,
                                               seed=seed)
    validate_ids(ids, ModelView(net))  # a --seq-len beyond the model's context is one line, before any forward
    calib, eval_ids = ids[:num_samples], ids[num_samples:]
    pruned, selection = prune(net, drop, unit=unit, input_ids=calib, n=n, method=method, fit_ids=fit_ids,
                              progress=progress)
    before = _measure(net, tokenizer, eval_ids, tasks, limit)
    after = _measure(pruned, tokenizer, eval_ids, tasks, limit)
    L = ModelView(net).n_layers
    report = {"model": str(model), "unit": unit, "n_layers_before": L,
              "n_layers_after": L - len(selection.dropped) if unit == "block" else L,
              "dropped": selection.dropped, "kept": [l for l in range(L) if l not in selection.dropped],
              "method": selection.method, "selection_scores": selection.scores, "saved_as": save_format(pruned),
              "saved_dtype": dtype_name(stored), "out": str(out),
              "sample": {**sample, "calibration_windows": num_samples, "eval_windows": eval_samples},
              "before": before, "after": after,
              "settings": {"drop": drop, "n": n, "method": method, "tasks": tasks, "limit": limit,
                           "num_samples": num_samples, "eval_samples": eval_samples, "seq_len": seq_len, "seed": seed,
                           "data": None if data is None else str(data), "dtype": dtype, "device": str(device)},
              "provenance": provenance(net)}
    if net is not source:  # the same blocks removed from the stored-precision model: the saved copy loses nothing
        del net
        pruned, _ = prune(source, selection.dropped, unit=unit)
    source_config = RunDir.of(source.checkpoint_path).read_config() if getattr(source, "checkpoint_path", None) \
        else None
    save_pruned(pruned, tokenizer, out, source_config, files={"prune_report.json": dumps_json(report, indent=1) + "\n"},
                overwrite=overwrite, protect=protect)
    return report


def format_report(report: dict) -> str:
    """The before/after table `depthlab prune` prints."""
    b, a = report["before"], report["after"]
    rows = [("blocks", str(report["n_layers_before"]), str(report["n_layers_after"])),
            ("perplexity", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}"),
            ("nll (nats/token)", f"{b['nll']:.4f}", f"{a['nll']:.4f}")]
    for task in b.get("tasks", {}):
        for metric in ("acc,none", "acc_norm,none"):
            if metric in b["tasks"][task]:
                rows.append((f"{task} {metric.split(',')[0]}", f"{b['tasks'][task][metric]:.4f}",
                             f"{a['tasks'][task][metric]:.4f}"))
    if b.get("average_acc") is not None:
        rows.append(("average acc", f"{b['average_acc']:.4f}", f"{a['average_acc']:.4f}"))
    unit = report["unit"]
    what = "dropped blocks" if unit == "block" else f"zeroed the {unit} sub-layer of blocks"
    lines = [(f"{what} {report['dropped']} ({report['method']}); saved as {report['saved_as']} folder "
             f"{report['out']}"), "| | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    return "\n".join(lines)
