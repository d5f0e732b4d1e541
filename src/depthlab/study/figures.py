"""The study report's figures, each rendered to PNG bytes (so the HTML can embed them and the Markdown link them).

Every function takes the aggregated rows (one per setting, see ``depthlab.study.report.aggregate``) and returns
None when the study has nothing to plot for it. Seed-to-seed spread is drawn as error bars (±1 sample standard
deviation) or bands wherever a setting has several seeds.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

DPI = 80
ANALYSIS_METRICS = (("usefulness", "usefulness"), ("causal", "causal effect"), ("permutation", "permutation score"))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def _stack(series: list[list[float]]) -> np.ndarray:
    """Seed curves of possibly different lengths → [seeds, shortest length] (compare at equal steps)."""
    n = min(len(s) for s in series)
    return np.array([s[:n] for s in series], dtype=float)


def variance_vs_step(rows: list[dict]) -> bytes | None:
    """Last-layer residual variance (out_var of block L-1, pre-final-norm) vs training step, one line per setting."""
    rows = [r for r in rows if r["var_steps"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row, color in zip(rows, _colors(len(rows))):
        curves = _stack(row["var_curves"])
        steps = row["var_steps"][:curves.shape[1]]
        ax.plot(steps, curves.mean(0), color=color, label=row["label"])
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
    ax.set(xlabel="step", ylabel="last-layer variance (raw stream)", yscale="log",
           title="Last-layer variance during training")
    ax.legend(fontsize=8)
    return _png(fig)


def _profile(rows: list[dict], key: str, ylabel: str, title: str, log: bool) -> bytes | None:
    rows = [r for r in rows if r[key]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row, color in zip(rows, _colors(len(rows))):
        values = _stack(row[key])
        layers = np.arange(values.shape[1])
        ax.errorbar(layers, values.mean(0), yerr=values.std(0, ddof=1) if len(values) > 1 else None,
                    color=color, marker="o", ms=3, capsize=2, label=row["label"])
    ax.set(xlabel="block l", ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.legend(fontsize=8)
    return _png(fig)


def variance_profile(rows: list[dict]) -> bytes | None:
    """Per-layer out_var at the last logged training step, one line per setting."""
    return _profile(rows, "profiles", "variance of h_{l+1}", "Per-layer variance at the end of training", True)


def jacobian_profile(rows: list[dict]) -> bytes | None:
    """Per-layer ||J − I||_F / d (position-summed Jacobian of each block), one line per setting."""
    return _profile(rows, "jacobian_profiles", "||J − I||_F / d", "Jacobian distance from identity per layer",
                    False)


def _knob_axis(rows: list[dict], knob: str | None):
    """x positions and tick labels: the knob's values when all are numbers, else categorical setting labels."""
    values = [r["setting"].get(knob) for r in rows] if knob else [None]
    if knob and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        positive = [v for v in values if v > 0]
        log = len(positive) == len(values) and max(values) / min(values) >= 8
        return np.array(values, dtype=float), None, log
    return np.arange(len(rows), dtype=float), [r["label"] for r in rows], False


def _errorbar(ax, x, rows, key, **kwargs) -> bool:
    points = [(xi, r["metrics"][key]) for xi, r in zip(x, rows) if r["metrics"].get(key)]
    if not points:
        return False
    xs = [p[0] for p in points]
    means = [p[1]["mean"] for p in points]
    errors = [p[1]["std"] or 0.0 for p in points]
    ax.errorbar(xs, means, yerr=errors if any(errors) else None, marker="o", capsize=3, **kwargs)
    return True


def _finish_knob_axis(ax, knob, ticks, log) -> None:
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
    elif log:
        ax.set_xscale("log")
    ax.set_xlabel(knob if ticks is None else "setting")


def analysis_vs_knob(rows: list[dict], knob: str | None) -> bytes | None:
    """Usefulness, causal effect and permutation score vs the knob (vs depth in the depth study)."""
    x, ticks, log = _knob_axis(rows, knob)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn = [_errorbar(ax, x, rows, key, label=label) for key, label in ANALYSIS_METRICS]
    if not any(drawn):
        plt.close(fig)
        return None
    _finish_knob_axis(ax, knob, ticks, log)
    ax.set(ylabel="score", title=f"Layer-effectiveness metrics vs {knob or 'setting'}")
    ax.legend(fontsize=8)
    return _png(fig)


def ppl_usefulness_vs_knob(rows: list[dict], knob: str | None) -> bytes | None:
    """Perplexity (left) and usefulness (right) vs the knob."""
    x, ticks, log = _knob_axis(rows, knob)
    if not any(r["metrics"].get("ppl") or r["metrics"].get("usefulness") for r in rows):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((ax1, "ppl", "perplexity"), (ax2, "usefulness", "usefulness")):
        if _errorbar(ax, x, rows, key, color="C0" if key == "ppl" else "C2"):
            _finish_knob_axis(ax, knob, ticks, log)
            ax.set(ylabel=label, title=f"{label} vs {knob or 'setting'}")
        else:
            ax.set_axis_off()
    return _png(fig)


def accuracy_bars(rows: list[dict]) -> bytes | None:
    """The recipe chart: average downstream accuracy bars per setting, usefulness markers on a second axis."""
    rows = [r for r in rows if r["metrics"].get("avg_acc")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = np.arange(len(rows))
    acc = [r["metrics"]["avg_acc"] for r in rows]
    spread = [a["std"] or 0.0 for a in acc]
    ax.bar(x, [a["mean"] for a in acc], yerr=spread if any(spread) else None, capsize=3, color="C0", alpha=0.8,
           label="avg accuracy")
    low = min(a["mean"] for a in acc)
    ax.set_ylim(max(0.0, math.floor(low - 5)), None)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="average downstream accuracy (%)", title="Average accuracy and usefulness per setting")
    useful = [(xi, r["metrics"]["usefulness"]) for xi, r in zip(x, rows) if r["metrics"].get("usefulness")]
    if useful:
        ax2 = ax.twinx()
        spread = [u[1]["std"] or 0.0 for u in useful]
        ax2.errorbar([u[0] for u in useful], [u[1]["mean"] for u in useful], yerr=spread if any(spread) else None,
                     fmt="D", color="C3", capsize=3, label="usefulness")
        ax2.set(ylabel="usefulness", ylim=(0, 1.05))
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)
