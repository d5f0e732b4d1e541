"""TensorBoard and Weights & Biases: the run's metrics and its per-layer statistics, under the same keys in both.

``metrics.jsonl`` and ``layer_stats.jsonl`` stay the record of a run; the loggers mirror them so that the tools
researchers already watch show depth-resolved quantities as they train:

- a metrics line (loss, lr, grad_norm, val_loss, ...) → one scalar per key, e.g. ``train/loss``, ``val/val_loss``;
- a statistics line → one scalar per layer and statistic, ``{stat}/layer_{l:02d}`` (``out_var/layer_03``,
  ``attn_norm/layer_00``, ``weight_sparsity``..., ``moe_imbalance/layer_01``), the whole-model values as
  ``stats/{key}`` (``stats/final_norm_var``), a per-layer list (an MoE layer's expert load) as a histogram, and one
  profile figure ``profile/layers`` with a panel per statistic: the value against the layer index at that step.
  The figure is drawn at every ``logging.profile_every``-th statistics line only: matplotlib takes about a second
  per figure on a CPU, longer than a tiny model's training step, so one per line cost the tiny studies ≈5% of
  their time (benchmarks/train_throughput.py measures it).

Whatever keys the statistics carry are logged, so new statistics appear without touching this module. A logger that
is requested but not installed is a one-line warning, never a failed run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

PROFILE_KEYS_MAX = 12
"""At most this many statistics get a panel in the profile figure (the first ones of a line, in its order)."""


def _scalar(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl line → {tag: value}: validation keys under val/, the rest under train/."""
    return {f"{'val' if k.startswith('val_') else 'train'}/{k}": v for k, value in record.items()
            if k not in ("step", "tokens") and (v := _scalar(value)) is not None}


def layer_scalars(record: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A layer_stats.jsonl line → ({tag: value}, {tag: list}) with tags ``{stat}/layer_{l:02d}`` and ``stats/{key}``."""
    scalars, lists = {}, {}
    for key, value in record.items():
        if key not in ("step", "tokens", "layers") and (v := _scalar(value)) is not None:
            scalars[f"stats/{key}"] = v
    for entry in record.get("layers", []):
        layer = entry.get("layer")
        for key, value in entry.items():
            if key == "layer":
                continue
            tag = f"{key}/layer_{layer:02d}"
            if isinstance(value, (list, tuple)) and value and all(_scalar(x) is not None for x in value):
                lists[tag] = [float(x) for x in value]
            elif (v := _scalar(value)) is not None:
                scalars[tag] = v
    return scalars, lists


def profile_figure(record: dict):
    """One matplotlib figure: for each per-layer statistic of `record`, its value against the layer index."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = record.get("layers", [])
    keys = [k for k in (layers[0] if layers else {}) if k != "layer" and _scalar(layers[0][k]) is not None]
    keys = keys[:PROFILE_KEYS_MAX]
    cols = min(3, max(1, len(keys)))
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    x = [e.get("layer", i) for i, e in enumerate(layers)]
    for ax, key in zip(axes.flat, keys):
        y = [_scalar(e.get(key)) for e in layers]
        ax.plot(x, [math.nan if v is None else v for v in y], marker="o", ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"step {record.get('step')}", fontsize=9)
    fig.tight_layout()
    return fig


def warn(message: str) -> None:
    print(f"depthlab train: warning: {message}", file=sys.stderr)


class Loggers:
    """The external loggers a config asks for (``logging.tensorboard``, ``logging.wandb_project``)."""

    def __init__(self, cfg, run_dir: Path):
        self._tb = self._wandb = None
        self._profile_every, self._stats_lines = cfg.logging.profile_every, 0
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn("logging.tensorboard is on but tensorboard is not installed (pip install 'depthlab[tensorboard]'"
                     " or set --logging.tensorboard=false); metrics.jsonl and layer_stats.jsonl still have everything")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                warn(f"logging.wandb_project={cfg.logging.wandb_project} but wandb is not installed (pip install "
                     "wandb); metrics.jsonl and layer_stats.jsonl still have everything")
            else:
                self._wandb = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                                         dir=str(run_dir), config=cfg.to_dict(), resume="allow")

    def metrics(self, record: dict) -> None:
        self._log(metric_scalars(record), {}, record["step"], None)

    def layer_stats(self, record: dict) -> None:
        if not (self._tb or self._wandb):
            return
        scalars, lists = layer_scalars(record)
        draw = bool(self._profile_every and record.get("layers") and self._stats_lines % self._profile_every == 0)
        self._stats_lines += 1
        self._log(scalars, lists, record["step"], profile_figure(record) if draw else None)

    def _log(self, scalars: dict, lists: dict, step: int, figure) -> None:
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            for tag, values in lists.items():
                self._tb.add_histogram(tag, np.asarray(values), step)
            if figure is not None:
                self._tb.add_figure("profile/layers", figure, step, close=False)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            data = dict(scalars)
            data.update({tag: wandb.Histogram(values) for tag, values in lists.items()})
            if figure is not None:
                data["profile/layers"] = wandb.Image(figure)
            self._wandb.log(data, step=step)
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
