"""The study report's figures, each rendered to PNG bytes (so the HTML can embed them and the Markdown link them).

Every function takes the aggregated rows (one per setting, see ``depthlab.study.report.aggregate``) and a context
line (model shape, training length, analysis sample, seeds) for the title, and returns None when the study has
nothing to plot for it. Conventions, so every figure reads the same: one metric per axis; the seed-to-seed spread
as the 95% Student-t interval of the mean (bands over steps, error bars over settings; for variances, on a log y
axis, the interval of the mean log around the geometric mean); a knob spanning a factor
≥ 4 on a log₂ axis ticked at its values (weight decay, which includes 0, on a symmetric-log axis); integer block
ticks; 1000 px wide at ≥ 11 pt.
"""

from __future__ import annotations

import functools
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from depthlab.study.claims import t_quantile

DPI = 100
WIDTH = 10.0
"""Figure width in inches: 1000 px at DPI."""
STYLE = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "xtick.labelsize": 11, "ytick.labelsize": 11,
         "legend.fontsize": 11, "figure.titlesize": 13}
USEFULNESS_LABEL = "usefulness (fraction of useful blocks)"
ANALYSIS_METRICS = (("usefulness", USEFULNESS_LABEL), ("causal", "causal effect"),
                    ("permutation", "permutation score"))
KNOB_LABELS = {"model.n_layers": r"depth $L$", "optimizer.weight_decay": r"weight decay $\lambda$",
               "model.seq_len": r"context $T$", "model.n_kv_heads": r"key/value heads $n_{\mathrm{kv}}$",
               "model.moe.num_experts": r"experts $E$", "model.moe.top_k": r"active experts $k$",
               "optimizer.lr": r"learning rate $\eta$", "model.d_model": r"width $d$"}
FRACTION_LIMITS = (-0.05, 1.05)
"""y range of every usefulness panel (a fraction of blocks)."""
VAR_LABEL = r"last-layer variance $\mathrm{Var}(h_L)$"


def _styled(fn):
    """Draw under the report style without touching matplotlib's global settings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _png(fig, title: str, context: str) -> bytes:
    fig.suptitle(f"{title}\n{context}" if context else title)
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


def _band(values: np.ndarray) -> np.ndarray | None:
    """Half-width of the 95% t-interval of the mean over axis 0 (seeds); None for a single seed."""
    n = values.shape[0]
    if n < 2:
        return None
    return t_quantile(n - 1) * values.std(0, ddof=1) / math.sqrt(n)


def _center_band(values: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(center, lower, upper) over seeds: the mean ± its 95% interval, or for a log-scale quantity the geometric
    mean × / ÷ the interval of the mean log (so the band stays positive and matches the claims' log-scale effects)."""
    if log:
        logs = np.log(np.clip(values, 1e-300, None))
        center, half = logs.mean(0), _band(logs)
        return np.exp(center), *((None, None) if half is None else (np.exp(center - half), np.exp(center + half)))
    center, half = values.mean(0), _band(values)
    return center, *((None, None) if half is None else (center - half, center + half))


def _legend(ax, rows) -> None:
    if len(rows) > 1:
        ax.legend(title="setting", ncols=2 if len(rows) > 6 else 1)


@_styled
def variance_vs_step(rows: list[dict], context: str = "") -> bytes | None:
    """Last-layer residual variance (out_var of block L-1, pre-final-norm) vs training step, one line per setting."""
    rows = [r for r in rows if r["var_steps"] and r["var_curves"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 5))
    for row, color in zip(rows, _colors(len(rows))):
        curves = _stack(row["var_curves"])
        steps = np.array(row["var_steps"][:curves.shape[1]])
        center, low, high = _center_band(curves, log=True)
        ax.plot(steps, center, color=color, label=f"{row['label']} (n={len(curves)})")
        if low is not None:
            ax.fill_between(steps, low, high, color=color, alpha=0.2)
    ax.set(xlabel="training step", ylabel=VAR_LABEL, yscale="log")
    _legend(ax, rows)
    return _png(fig, "Last-layer variance during training", context)


@_styled
def usefulness_vs_step(rows: list[dict], context: str = "") -> bytes | None:
    """Usefulness (left) and the mean log loss ratio (right) at every analysed checkpoint, one line per setting."""
    rows = [r for r in rows if any(len(d) > 1 for d in r["dynamics"])]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 4.5))
    panels = (("usefulness", USEFULNESS_LABEL),
              ("continuous_usefulness", r"mean $\log(\mathcal{L}_\ell / \mathcal{L}_0)$"))
    for ax, (key, label) in zip(axes, panels):
        for row, color in zip(rows, _colors(len(rows))):
            steps = sorted(set.intersection(*({p["step"] for p in d if key in p} for d in row["dynamics"])))
            if not steps:
                continue
            values = np.array([[next(p[key] for p in d if p["step"] == s) for s in steps] for d in row["dynamics"]])
            mean, half = values.mean(0), _band(values)
            ax.errorbar(steps, mean, yerr=half, color=color, marker="o", capsize=3,
                        label=f"{row['label']} (n={len(values)})")
            if half is not None:
                ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.15)
        ax.set(xlabel="training step", ylabel=label)
    axes[0].set_ylim(*FRACTION_LIMITS)
    _legend(axes[1], rows)
    return _png(fig, "Usefulness during training", context)


def _profile(rows: list[dict], key: str, ylabel: str, title: str, log: bool, context: str) -> bytes | None:
    rows = [r for r in rows if r[key]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 5))
    for row, color in zip(rows, _colors(len(rows))):
        values = _stack(row[key])
        layers = np.arange(values.shape[1])
        center, low, high = _center_band(values, log)
        ax.errorbar(layers, center, yerr=None if low is None else [center - low, high - center], color=color,
                    marker="o", ms=4, capsize=3, label=f"{row['label']} (n={len(values)})")
    ax.set(xlabel=r"block $\ell$", ylabel=ylabel, yscale="log" if log else "linear")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, rows)
    return _png(fig, title, context)


@_styled
def variance_profile(rows: list[dict], context: str = "") -> bytes | None:
    """Per-layer out_var at the last logged training step, one line per setting."""
    return _profile(rows, "profiles", r"$\mathrm{Var}(h_{\ell+1})$", "Per-layer variance at the end of training",
                    True, context)


@_styled
def jacobian_profile(rows: list[dict], context: str = "") -> bytes | None:
    """Per-layer ||J − I||_F / d (position-summed Jacobian of each block), one line per setting."""
    return _profile(rows, "jacobian_profiles", r"$\|J_\ell - I\|_F \,/\, d$", "Distance of each block from identity",
                    False, context)


def _knob_axis(rows: list[dict], knob: str | None):
    """x positions and tick labels: the knob's values when all are numbers, else categorical setting labels."""
    values = [r["setting"].get(knob) for r in rows] if knob else [None]
    if knob and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=float), None
    return np.arange(len(rows), dtype=float), [r["label"] for r in rows]


def _finish_knob_axis(ax, knob, x, ticks) -> None:
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right")
        ax.set_xlabel("setting")
        return
    values = sorted(set(x.tolist()))
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(values) / min(values) >= 4:
        ax.set_xscale("log", base=2)
    elif positive and min(values) == 0 and max(values) / min(positive) >= 4:
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.set_xlabel(KNOB_LABELS.get(knob, knob))


def _errorbar(ax, x, rows, key, **kwargs) -> bool:
    points = [(xi, r["metrics"][key], r) for xi, r in zip(x, rows) if r["metrics"].get(key)]
    if not points:
        return False
    ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                yerr=[p[1].get("half") or 0.0 for p in points], marker="o", capsize=4, **kwargs)
    return True


def _per_metric(rows, knob, metrics, title, context) -> bytes | None:
    """One panel per metric against the knob (metrics a setting lacks are left out)."""
    present = [(k, label) for k, label in metrics if any(r["metrics"].get(k) for r in rows)]
    if not present:
        return None
    x, ticks = _knob_axis(rows, knob)
    fig, axes = plt.subplots(1, len(present), figsize=(WIDTH, 4.5), squeeze=False)
    for ax, (key, label), color in zip(axes[0], present, ("C2", "C0", "C1")):
        _errorbar(ax, x, rows, key, color=color)
        _finish_knob_axis(ax, knob, x, ticks)
        ax.set_ylabel(label)
        if key == "usefulness":
            ax.set_ylim(*FRACTION_LIMITS)  # a fraction of blocks: show all of [0, 1], so 0 reads as 0 and not as noise
    return _png(fig, title, context)


@_styled
def analysis_vs_knob(rows: list[dict], knob: str | None, context: str = "") -> bytes | None:
    """Usefulness, causal effect and permutation score vs the knob (vs depth in the depth study)."""
    name = KNOB_LABELS.get(knob, knob or "setting")
    return _per_metric(rows, knob, ANALYSIS_METRICS, f"Layer-effectiveness metrics vs {name}", context)


@_styled
def ppl_usefulness_vs_knob(rows: list[dict], knob: str | None, context: str = "") -> bytes | None:
    """Perplexity, usefulness and its threshold-free form (the mean log loss ratio) vs the knob."""
    name = KNOB_LABELS.get(knob, knob or "setting")
    return _per_metric(rows, knob, (("ppl", "perplexity"), ("usefulness", USEFULNESS_LABEL),
                                    ("continuous_usefulness", r"mean $\log(\mathcal{L}_\ell / \mathcal{L}_0)$")),
                       f"Perplexity and usefulness vs {name}", context)


@_styled
def accuracy_bars(rows: list[dict], context: str = "") -> bytes | None:
    """The recipe chart: average downstream accuracy bars (left) and usefulness (right) per setting."""
    rows = [r for r in rows if r["metrics"].get("avg_acc")]
    if not rows:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(WIDTH, 4.8))
    x = np.arange(len(rows))
    acc = [r["metrics"]["avg_acc"] for r in rows]
    ax.bar(x, [a["mean"] for a in acc], yerr=[a.get("half") or 0.0 for a in acc], capsize=4, color="C0", alpha=0.8)
    low = min(a["mean"] for a in acc)
    ax.set_ylim(max(0.0, math.floor(low - 5)), None)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("average downstream accuracy (%)")
    useful = [(xi, r["metrics"]["usefulness"]) for xi, r in zip(x, rows) if r["metrics"].get("usefulness")]
    if useful:
        ax2.errorbar([u[0] for u in useful], [u[1]["mean"] for u in useful],
                     yerr=[u[1].get("half") or 0.0 for u in useful], fmt="D", color="C3", capsize=4)
        ax2.set_ylim(*FRACTION_LIMITS)
    ax2.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right")
    ax2.set_ylabel(USEFULNESS_LABEL)
    return _png(fig, "Average accuracy and usefulness per setting", context)
