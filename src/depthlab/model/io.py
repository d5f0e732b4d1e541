"""Opening depthlab runs and checkpoints as (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from depthlab import config as cfgmod
from depthlab.errors import ModelLoadError
from depthlab.model.transformer import Transformer
from depthlab.train import checkpoint as ckpt


def _run_dir(path: Path) -> Path:
    """The run folder of a run path or of one of its checkpoint folders."""
    return path.parent.parent if (path / ckpt.META_FILE).exists() else path


def is_depthlab_path(path: str | Path) -> bool:
    """A run folder (config.yaml + checkpoints/) or a checkpoint folder inside one."""
    path = Path(path)
    run = _run_dir(path)
    return path.is_dir() and (run / "config.yaml").exists() and (run / "checkpoints").is_dir()


def load_depthlab(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load the latest checkpoint of a run folder (or a given checkpoint folder) → (Transformer, tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    run = _run_dir(path)
    cfg = cfgmod.from_dict(cfgmod.read_yaml(run / "config.yaml"))
    cfgmod.validate(cfg)
    if (path / ckpt.META_FILE).exists():
        checkpoint = path
    else:
        found = ckpt.list_checkpoints(run / "checkpoints")
        if not found:
            raise ModelLoadError(f"run {run} has no complete checkpoint yet")
        checkpoint = found[-1]
    model = Transformer(cfg.model)
    ckpt.load_model_weights(checkpoint, model)
    model.to(device=device, dtype=dtype).eval()
    model.checkpoint_path = str(checkpoint)
    if not (run / "tokenizer.json").exists():
        raise ModelLoadError(f"run {run} has no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(run))
    return model, tokenizer
