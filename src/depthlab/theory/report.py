"""Conclusions computed from a simulation's numbers, its figures, and results.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from depthlab.errors import ConfigError
from depthlab.fileio import atomic_write
from depthlab.provenance import provenance


def _fmt(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def _exponent(ps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares exponent α of values ∝ p^α."""
    return float(np.polyfit(np.log(ps), np.log(values), 1)[0])


def conclusions(result) -> list[str]:
    """Short statements, each backed by the numbers it quotes."""
    st = result.settings
    unit = st.d_model * st.sigma_w ** 2
    lines = []
    for run in result.runs:
        ps = np.array(run.densities)
        tag = f"{run.mask}/{run.norm}"
        order = np.argsort(-ps)
        parts = []
        if run.norm != "post":
            parts.append(f"Var growth ÷ d·σ_w² = {_fmt(np.array(run.slope)[order])} for "
                         f"p = {_fmt(ps[order])} (closed form {_fmt(np.array(run.p_var)[order])})")
        if len(ps) > 1:
            parts.append(f"||J−I||_F ∝ p^{_exponent(ps, run.jac[:, 0]):.2f} at block 0 and "
                         f"p^{_exponent(ps, run.jac[:, -1]):.2f} at block {st.layers - 1} "
                         f"(closed form p^{_exponent(ps, run.jac_closed[:, -1]):.2f})")
        if parts:
            lines.append(f"{tag}: " + "; ".join(parts))
        lines += _mechanism(run, st, ps, order, unit, tag)
    lines += _norm_comparison(result)
    lines += _iid_answer(result)
    return lines


def _increments(run, st, unit) -> tuple[np.ndarray, np.ndarray, int]:
    """Measured Var increment ÷ the closed form's: at block 0, and averaged over the last quarter."""
    s2 = 1 / np.arange(1, st.layers + 1) if run.norm == "lns" else np.ones(st.layers)
    ratio = np.diff(run.var, axis=1) / (s2 * np.array(run.p_var)[:, None] * unit)
    tail = max(1, st.layers // 4)
    return ratio[:, 0], ratio[:, -tail:].mean(axis=1), st.layers - tail


def _mechanism(run, st, ps, order, unit, tag) -> list[str]:
    low = int(np.argmin(ps))
    if run.mask == "magnitude" and run.norm != "post":
        kept = run.slope[low]
        return [(f"{tag}: keeping the largest |w| at p = {ps[low]:g} retains {kept:.3g} of the dense growth, "
                f"{kept / ps[low]:.2g}× what an i.i.d. mask of the same density retains")]
    if run.mask in ("attention", "gqa") and run.norm != "post":
        first, last, tail = _increments(run, st, unit)
        what = "Σa² = p" if run.mask == "attention" else f"Σa² = 1/{st.support:g}"
        if last.max() > 1.5 * first.max():
            trend = ("mixing correlates the tokens, so attention's averaging damps the growth only in the "
                     "first blocks")
        else:
            trend = "the closed form holds through depth"
        lines = [(f"{tag}: Var increment ÷ closed form ({what}) = {_fmt(first[order])} at block 0, "
                 f"{_fmt(last[order])} over blocks {tail}–{st.layers - 1}: {trend}")]
        if run.mask == "gqa" and len(ps) > 1:
            var_last = run.var[:, -1]
            spread = var_last.max() / var_last.min() - 1
            noise = 3 * (run.var_sem[:, -1] / var_last).max()
            verdict = "within" if spread <= noise else "beyond"
            lines.append(f"{tag}: Var(x_{st.layers}) = {_fmt(var_last[order])} for G = "
                         f"{_fmt(np.round(1 / ps[order]))}: a {spread:.1%} spread, {verdict} 3 seed s.e. "
                         f"(±{noise:.1%}); the closed form does not depend on G")
        return lines
    if run.mask == "routing":
        ratio = run.jac_mean[:, -1] / run.jac[:, -1]
        verb = "cancel" if ratio[low] < 0.9 * ratio.max() else "do not cancel"
        # Each token keeps a fraction p of the hidden units, independently across tokens: the token-mean mask
        # has E[m̄²] = p² + p(1 − p)/T per unit against p for one token (a fixed mask keeps the ratio at 1).
        closed = ("" if run.norm == "post" else
                  f" (closed form sqrt(p + (1−p)/T) = {_fmt(np.sqrt(ps + (1 - ps) / st.tokens)[order])})")
        return [(f"{tag}: token-averaged ||mean(J−I)||_F ÷ per-token RMS at block {st.layers - 1} = "
                 f"{_fmt(ratio[order])}{closed}: tokens routed to different experts {verb} in SPEC §5.3's "
                 "averaged Jacobian, a fixed mask would give 1")]
    return []


def _norm_comparison(result) -> list[str]:
    """Per mechanism at the densest p: final variance and last-block Jacobian distance per norm."""
    st = result.settings
    if len(st.norms) < 2:
        return []
    dense = int(np.argmax(st.densities))
    lines = []
    for mask in st.masks:
        runs = [r for r in result.runs if r.mask == mask]
        lines.append(f"{mask}, p = {st.densities[dense]:g}: Var(x_{st.layers}) "
                     + ", ".join(f"{r.norm} {r.var[dense, -1]:.3g}" for r in runs)
                     + f"; ||J−I||_F at block {st.layers - 1} "
                     + ", ".join(f"{r.norm} {r.jac[dense, -1]:.3g}" for r in runs)
                     + _post_flatness(runs, dense, st.layers))
    return lines


def _post_flatness(runs, dense: int, layers: int) -> str:
    post = [r for r in runs if r.norm == "post"]
    if not post or layers < 3:
        return ""
    jac = post[0].jac[dense]
    return f"; Post-LN ||J−I||_F from block 1 to {layers - 1}: {jac[1]:.3g} → {jac[-1]:.3g}"


def _iid_answer(result) -> list[str]:
    """SPEC §7's caveat, answered with the i.i.d./Pre-LN numbers when they were simulated."""
    st = result.settings
    runs = [r for r in result.runs if r.mask == "iid" and r.norm == "pre"]
    if not runs or len(st.densities) < 2:
        return []
    ps = np.array(st.densities)
    rel = runs[0].rel_update[:, -1]
    l0 = st.sigma0 ** 2 / (ps * st.d_model * st.sigma_w ** 2)
    hi, lo = int(np.argmax(ps)), int(np.argmin(ps))
    return [(f"iid/pre: the relative update ≈ 1/sqrt(l + l0) with l0 = σ0²/(p·d·σ_w²) = {_fmt(l0)} blocks: "
             f"sparsity acts only through l0 (the initial variance); with σ0 = {st.sigma0:g} the relative "
             f"update at block {st.layers - 1} is {rel[lo]:.3g} at p = {ps[lo]:g} vs {rel[hi]:.3g} at "
             f"p = {ps[hi]:g} (smaller = closer to the identity)")]


# ------------------------------------------------------------------------------------------------------------
# Output files


def save(result, out: str | os.PathLike) -> list[str]:
    """results.json plus ``<mask>_<norm>.png`` per run and ``summary.png``, each written atomically."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e}") from None
    paths = [out / "results.json"]
    text = json.dumps({**result.to_dict(), "provenance": provenance(device="cpu")}, indent=1, allow_nan=False)
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(text))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [(f"{run.mask}_{run.norm}.png", _run_figure(plt, run, result.settings)) for run in result.runs]
    figures.append(("summary.png", _summary_figure(plt, result)))
    for name, fig in figures:
        if fig is not None:
            paths.append(out / name)
            atomic_write(paths[-1], lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
            plt.close(fig)
    return [str(p) for p in paths]


def _run_figure(plt, run, st):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run.densities)))
    blocks = np.arange(st.layers)
    panels = [(run.var, run.var_closed, np.arange(st.layers + 1), "Var(x_l) (mean square per feature)", "l"),
              (run.jac, run.jac_closed, blocks, "||∂x_{l+1}/∂x_l − I||_F (RMS over tokens)", "block l"),
              (run.rel_update, run.rel_closed, blocks, "relative update ||x_{l+1}−x_l|| / ||x_l||",
               "block l")]
    for ax, (sim, closed, xs, title, xlabel) in zip(axes, panels):
        for i, p in enumerate(run.densities):
            ax.plot(xs, sim[i], color=colors[i], label=f"p = {p:g}")
            if closed is not None:
                ax.plot(xs, closed[i], color=colors[i], linestyle="--", linewidth=1)
    for i in range(len(run.densities)):
        axes[1].plot(blocks, run.jac_mean[i], color=colors[i], linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=8, title="solid: simulated\ndashed: closed form\ndotted: token-averaged J",
                   title_fontsize=8)
    fig.suptitle(f"{run.mask} masks, {run.norm} norm: d = {st.d_model}, {st.seeds} seeds, "
                 f"σ_w = {st.sigma_w:g}, σ0 = {st.sigma0:g}")
    fig.tight_layout()
    return fig


def _summary_figure(plt, result):
    """Measured growth ÷ d·σ_w² (the effective density) against p, one line per mechanism and norm."""
    runs = [r for r in result.runs if r.norm != "post" and len(r.densities) > 1]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ps = np.array(result.settings.densities)
    grid = np.linspace(ps.min(), ps.max(), 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="p (i.i.d. closed form)")
    for run in runs:
        order = np.argsort(ps)
        ax.plot(ps[order], np.array(run.slope)[order], marker="o", label=f"{run.mask}/{run.norm}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density p")
    ax.set_ylabel("Var growth per unit depth ÷ d·σ_w²")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
