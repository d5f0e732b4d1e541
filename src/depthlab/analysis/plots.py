"""PNG figures for `depthlab analyze`: one small function per metric, each written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depthlab.fileio import atomic_write


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _heatmap(path: Path, matrix, title: str, xlabel: str, ylabel: str) -> None:
    plt, fig, (ax,) = _figure()
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _save(plt, fig, path)


def plot_result(name: str, result: dict, out: Path) -> list[Path]:
    """Write the figures of one metric's result dict into `out`; returns the paths written."""
    written = []
    if name == "variance":
        plt, fig, (a, b) = _figure(2)
        layers = range(len(result["out_var"]))
        for key in ("out_var", "attn_var", "ffn_var"):
            a.plot(layers, result[key], marker=".", label=key)
        a.set(yscale="log", xlabel="block l", ylabel="variance across features", title="stream and branch variance")
        a.legend()
        b.plot(layers, result["relative_update"], marker=".")
        b.set(xlabel="block l", ylabel="||h_{l+1}-h_l|| / ||h_l||", title="relative update")
        written.append(out / "variance.png")
        _save(plt, fig, written[-1])
    elif name == "angular":
        plt, fig, (a,) = _figure()
        a.plot(result["angular_distance"], marker=".", label="angular distance")
        a.plot(result["block_influence"], marker=".", label="block influence (1 - cos)")
        a.set(xlabel="block l", title="how much each block turns the stream")
        a.legend()
        written.append(out / "angular.png")
        _save(plt, fig, written[-1])
    elif name == "usefulness":
        plt, fig, (a,) = _figure()
        ratios = result["loss_ratios"]
        a.bar(range(len(ratios)), ratios, color=["C0" if u else "C7" for u in result["useful"]])
        a.axhline(1 + result["tau"], color="C3", linestyle="--", label=f"1 + tau = {1 + result['tau']:.2f}")
        a.set(xlabel="block l (replaced by its best affine map)", ylabel="loss ratio L_l / L_0",
              title=f"usefulness score {result['score']:.3f}", ylim=(min(0.98, min(ratios)), None))
        a.legend()
        written.append(out / "usefulness.png")
        _save(plt, fig, written[-1])
    elif name == "causal":
        written.append(out / "causal.png")
        _heatmap(written[-1], result["matrix"], "causal effect C[s, l]", "affected block l", "skipped block s")
    elif name == "permutation":
        written.append(out / "permutation.png")
        _heatmap(written[-1], result["matrix"], "permutation score P(a, b)", "block b", "block a")
    elif name == "jacobian":
        plt, fig, (a,) = _figure()
        rows = result["layers"]
        a.plot([r["layer"] for r in rows], [r["jacobian_norm"] for r in rows], marker=".")
        a.set(xlabel="block l", ylabel="||M - I||_F / d", title=f"Jacobian distance from identity ({result['mode']})")
        written.append(out / "jacobian.png")
        _save(plt, fig, written[-1])
    elif name == "moe":
        written.append(out / "moe_load.png")
        _heatmap(written[-1], result["load"], "expert load (fraction of token-slots)", "expert", "block l")
    elif name == "attention_sparsity":
        written.append(out / "attention_entropy.png")
        _heatmap(written[-1], result["normalized_entropy"], "normalised attention entropy", "head", "block l")
    elif name in ("lens", "tuned_lens"):
        plt, fig, (a, b) = _figure(2)
        layers = range(len(result["kl"]))
        a.plot(layers, result["kl"], marker=".", label=name.replace("_", " "))
        if name == "tuned_lens":
            a.plot(layers, result["logit_kl"], marker=".", label="logit lens (same tokens)")
        a.set(yscale="symlog", xlabel="block l (output decoded)", ylabel="KL(final || lens) [nats]",
              title="where the prediction settles")
        a.legend()
        b.plot(layers, result["top1_agreement"], marker=".", label="top-1 = final top-1")
        b.plot(layers, [float(np.exp(v)) for v in result["target_logprob"]], marker=".",
               label="exp(mean log p(target))")
        b.set(xlabel="block l", ylim=(0, 1.02), title="agreement with the output")
        b.legend()
        written.append(out / f"{name}.png")
        _save(plt, fig, written[-1])
    elif name == "branches":
        plt, fig, (a, b) = _figure(2)
        x = np.arange(len(result["attn_removed"]))
        for ax, kind in ((a, "removed"), (b, "affine")):
            ax.bar(x - 0.2, result[f"attn_{kind}"], 0.4, label="attention")
            ax.bar(x + 0.2, result[f"ffn_{kind}"], 0.4, label="MLP / MoE")
            ax.axhline(1.0, color="C7", linewidth=0.8)
            ax.set(yscale="log", xlabel="block l", ylabel="loss ratio L / L_0",
                   title="branch removed" if kind == "removed" else "branch replaced by its affine fit")
            ax.legend()
        written.append(out / "branches.png")
        _save(plt, fig, written[-1])
        for branch in ("attn", "ffn"):
            written.append(out / f"branches_{branch}_causal.png")
            _heatmap(written[-1], result[f"{branch}_causal"], f"causal effect of removing the {branch} branch",
                     "affected block l", f"block s ({branch} removed)")
    return written
