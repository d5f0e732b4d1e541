"""Figures of a training run's per-layer statistics (layer_stats.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from depthlab.rundir import RunDir


def read_layer_stats(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).layer_stats_path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_variance_profile(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Two panels: per-layer out_var at the last logged step, and each layer's out_var over training (log y)."""
    records = read_layer_stats(run_dir)
    if not records:
        return None
    out = Path(out or Path(run_dir) / "variance_profile.png")
    last = records[-1]
    n_layers = len(last["layers"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(range(n_layers), [layer["out_var"] for layer in last["layers"]], "o-", label="out_var (raw stream)")
    ax1.plot(range(n_layers), [layer["attn_var"] for layer in last["layers"]], "s--", label="attn branch")
    ax1.plot(range(n_layers), [layer["ffn_var"] for layer in last["layers"]], "^--", label="ffn branch")
    ax1.set(xlabel="block l", ylabel="variance across features", yscale="log",
            title=f"Per-layer variance at step {last['step']}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend()
    steps = [r["step"] for r in records]
    cmap = plt.get_cmap("viridis")
    for i in range(n_layers):
        ax2.plot(steps, [r["layers"][i]["out_var"] for r in records], color=cmap(i / max(1, n_layers - 1)),
                 label=f"block {i}" if n_layers <= 8 or i in (0, n_layers - 1) else None)
    ax2.set(xlabel="step", ylabel="out_var", yscale="log", title="Residual-stream variance during training")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
