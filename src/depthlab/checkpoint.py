"""Atomic, checksummed checkpoints.

Layout: ``RUN/checkpoints/step_000300/{model.safetensors, trainer_state.pt, meta.json}``. A checkpoint is written to
``step_000300.tmp`` and renamed into place only when complete, so a crash (or a full disk) mid-save leaves the previous
checkpoints untouched and never a half-written one under a real name. `meta.json` records the sha256 of every file;
loading verifies them, so flipped bytes or truncation are refused with a clear message. Pruning renames a checkpoint
to a hidden name before deleting it, so a kill mid-delete never leaves a half-deleted folder listed as a checkpoint.
The folder of a run as a whole (config, tokenizer, logs, these checkpoints) is described by `depthlab.rundir.RunDir`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from depthlab.errors import CheckpointError
from depthlab.fileio import dumps_json, file_sha256, fsync_dir, fsync_file, os_error_reason, unique_sibling

FORMAT = "depthlab-checkpoint-v1"
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "trainer_state.pt", "meta.json"
_NAME = re.compile(r"step_(\d+)")
"""A complete checkpoint's folder name; temporary and to-be-deleted folders never match it."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint folder holds, from its name."""
    match = _NAME.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (names look like step_000300)")
    return int(match.group(1))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:
            continue
        seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    return state


def save_checkpoint(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    keep_last: int, keep_every: int = 0) -> Path:
    """Write checkpoint `step` (weights as from `model_state`) atomically, then prune to the newest `keep_last`
    plus, with `keep_every` > 0, every step that is a multiple of it."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{final.name}.tmp"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, tmp / MODEL_FILE, metadata={"format": FORMAT, "step": str(step)})
        torch.save(trainer_state, tmp / STATE_FILE)
        files = {name: file_sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        meta = {"format": FORMAT, "step": step, "sha256": files}
        (tmp / META_FILE).write_text(dumps_json(meta, indent=2))
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            fsync_file(tmp / name)
        if final.exists():  # re-saving the same step (e.g. after resume): replace it as a whole
            _delete(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    # torch.save reports a full disk as a RuntimeError from its zip writer, safetensors as a SafetensorError
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os_error_reason(e)
        if not isinstance(e, OSError) and "disk full" not in reason:
            reason += "; disk full?"
        raise CheckpointError(f"could not save checkpoint step {step} ({reason}); "
                              f"earlier checkpoints in {ckpt_dir} are intact") from None
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        if not (keep_every and checkpoint_step(old) % keep_every == 0):
            _delete(old)
    return final


def _delete(checkpoint: Path) -> None:
    """Remove a checkpoint so that it is never half-listed: rename it to a name `list_checkpoints` ignores, then
    delete. A kill in between leaves a hidden folder, not a damaged checkpoint."""
    doomed = unique_sibling(checkpoint, ".deleting")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (temp folders excluded), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)
                  and (p / META_FILE).exists())


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint folder against its recorded checksums; return its meta."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a depthlab checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {META_FILE}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path} has unknown format {found!r}")
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or set(digests) != {MODEL_FILE, STATE_FILE}:  # an empty list would verify nothing
        raise CheckpointError(f"checkpoint {path} is corrupt: {META_FILE} does not list the checksums of "
                              f"{MODEL_FILE} and {STATE_FILE}")
    for name, digest in digests.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its recorded checksum")
    return meta


def load_model_weights(path: Path, model: torch.nn.Module, verify_checksums: bool = True) -> None:
    if verify_checksums:
        verify(path)
    try:
        state = load_file(path / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {e}") from None
    own = model.state_dict()
    resized = [f"{n} {tuple(t.shape)}→{tuple(own[n].shape)}" for n, t in state.items()
               if n in own and t.shape != own[n].shape]
    if resized:
        kind = "MoE" if any(".experts" in n or ".router" in n for n in resized) else "model"
        raise CheckpointError(f"checkpoint {path} does not fit this {kind} config: shapes differ for "
                              f"{', '.join(resized[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n == "lm_head.weight" and model.config.tie_embeddings}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        kind = "MoE" if any(".experts" in n or ".router" in n for n in [*missing, *unexpected]) else "model"
        raise CheckpointError(f"checkpoint {path} does not fit this {kind} config: missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {type(e).__name__}") from None
