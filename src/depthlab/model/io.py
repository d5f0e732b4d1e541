"""Opening depthlab runs and checkpoints as (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from depthlab import checkpoint as ckpt
from depthlab import config as cfgmod
from depthlab.errors import ModelLoadError
from depthlab.fileio import verify_checksum
from depthlab.model.transformer import Transformer
from depthlab.rundir import RunDir, is_checkpoint


def is_depthlab_path(path: str | Path) -> bool:
    """A run folder (config.yaml + checkpoints/) or a checkpoint folder inside one."""
    return Path(path).is_dir() and RunDir.of(path).is_run()


def load_depthlab(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load the latest checkpoint of a run folder (or a given checkpoint folder) → (Transformer, tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    run = RunDir.of(path)
    cfg = cfgmod.from_dict(run.read_config())
    cfgmod.validate(cfg)
    if not cfg.model.vocab_size:  # the trainer writes the resolved size; an empty or foreign config has none
        raise ModelLoadError(f"{run.config_path} does not set model.vocab_size: not the config a depthlab run "
                             "writes (damaged?)")
    checkpoint = path if is_checkpoint(path) else run.latest()
    if checkpoint is None:
        raise ModelLoadError(f"run {run.path} has no complete checkpoint yet")
    if not run.tokenizer_path.exists():
        raise ModelLoadError(f"run {run.path} has no {RunDir.TOKENIZER}")
    verify_checksum(run.tokenizer_path, ModelLoadError)  # runs from before the sidecar have none: read unchecked
    model = Transformer(cfg.model)
    ckpt.load_model_weights(checkpoint, model)
    model.to(device=device, dtype=dtype).eval()
    model.checkpoint_path = str(checkpoint)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(run.path))
    except Exception as e:  # noqa: BLE001 — the tokenizers library raises bare Exceptions for a torn file
        raise ModelLoadError(f"cannot read {run.tokenizer_path}: {str(e).splitlines()[0] if str(e) else e!r}"
                             ) from None
    return model, tokenizer
