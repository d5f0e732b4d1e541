"""Side-by-side comparisons.

* `compare_runs`: two run folders — config difference, final losses, per-layer variance, analysis.
* `compare_models`: any models `load_model` accepts (base vs pruned vs LNS, different families or sizes) — the
  chosen metrics on one shared sample, a per-layer table and overlay plots on a relative-depth axis
  ((l+1)/L for block l, so models of different depths line up), and linear CKA between every layer pair of every two
  models that share a tokenizer (`depthlab.analysis.cka`).

The shared sample is one seeded calibration sample drawn with the first model's tokenizer. Models with the same
vocabulary get the same token ids; for a model with another tokenizer each window is decoded to text and re-tokenised,
then all its windows are cut to the shortest one, so every model reads the same text (up to that cut). CKA needs
token-aligned states, so it is computed only between models that share token ids.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from depthlab import config as cfgmod
from depthlab.errors import StudyError
from depthlab.rundir import RunDir
from depthlab.study.report import read_run
from depthlab.study.runner import ANALYSIS_DIR, read_json

SUMMARY_KEYS = ("usefulness_score", "effective_depth", "causal_mean_effect", "permutation_mean_score")


def compare_runs(a: str | Path, b: str | Path) -> dict[str, Any]:
    """What differs between runs `a` and `b` and how they ended: a dict that `format_comparison` prints."""
    paths = [Path(a), Path(b)]
    for path in paths:
        if not RunDir(path).started():
            raise StudyError(f"{path} is not a run folder (no {RunDir.CONFIG})")
    configs = [RunDir(p).read_config() for p in paths]
    records = [read_run(p) for p in paths]
    summaries = [(read_json(p / ANALYSIS_DIR / "results.json") or {}).get("summary", {}) for p in paths]
    final = {key: [r["values"].get(key) for r in records]
             for key in ("train_loss", "val_loss", "ppl", "avg_acc", "usefulness", "causal", "permutation",
                         "last_var")}
    return {"runs": [str(p) for p in paths], "config_diff": cfgmod.diff(configs[0], configs[1]),
            "final": {k: v for k, v in final.items() if any(x is not None for x in v)},
            "steps": [r["steps"][-1] if r["steps"] else None for r in records],
            "variance": [r["profile"] for r in records],
            "analysis": {k: [s.get(k) for s in summaries] for k in SUMMARY_KEYS if any(k in s for s in summaries)}}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_comparison(c: dict[str, Any], markdown: bool = False) -> str:
    """Plain text (aligned columns) or Markdown (tables) of a comparison."""
    a, b = c["runs"]
    sections: list[tuple[str, list[list[str]]]] = [
        ("config difference", [["key", "A → B"]] + ([d.split(": ", 1) for d in c["config_diff"]]
                                                    or [["(none: same config)", ""]])),
        ("final values", [["", "A", "B"]] + [[k, _fmt(va), _fmt(vb)] for k, (va, vb) in c["final"].items()]),
        ("per-layer variance (last logged step" + (f" {c['steps'][0]} / {c['steps'][1]})" if any(c["steps"])
                                                   else ")"),
         [["block", "A", "B"]] + [[str(i), _fmt(_at(c["variance"][0], i)), _fmt(_at(c["variance"][1], i))]
                                   for i in range(max(map(len, c["variance"])))]),
        ("analysis", [["", "A", "B"]] + [[k, _fmt(va), _fmt(vb)] for k, (va, vb) in c["analysis"].items()]),
    ]
    lines = [f"# Comparison\n\nA: `{a}`  \nB: `{b}`\n" if markdown else f"A: {a}\nB: {b}"]
    for title, rows in sections:
        if len(rows) < 2:
            continue
        if markdown:
            lines += [f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
                      *("| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows[1:]), ""]
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines += ["", title] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                                    for r in rows]
    return "\n".join(lines) + "\n"


def _at(values: list, i: int):
    return values[i] if i < len(values) else None


# ---------------------------------------------------------------------------------------------------------------- #
COMPARE_METRICS = ("angular", "lens")
"""What `compare_models` measures by default: cheap, per-layer, and meaningful for any trained model."""


def shared_sample(models: list[tuple], refs: list[str], *, data=None, input_ids=None, num_samples: int = 8,
                  seq_len: int = 128, seed: int = 0) -> tuple[list, dict, list[str]]:
    """Token ids per model for one sample text: (ids per model, sample provenance, "shared" | "retokenised").

    `input_ids` [N, T] given instead of text can only be shared: models with another tokenizer are refused.
    """
    import hashlib

    import torch

    from depthlab.data import calibration_sample

    tok0 = models[0][1]
    if input_ids is None:
        ids0, sample = calibration_sample(tok0, text=data, num_samples=num_samples, seq_len=seq_len, seed=seed)
    else:
        ids0 = torch.as_tensor(input_ids).long()
        sample = {"source": "input_ids", "num_samples": int(ids0.shape[0]), "seq_len": int(ids0.shape[-1]),
                  "token_sha256": hashlib.sha256(ids0.numpy().tobytes()).hexdigest()}
    vocab0 = tok0.get_vocab()
    texts = None
    out, how = [], []
    for (_, tok), ref in zip(models, refs):
        if tok.get_vocab() == vocab0:
            out.append(ids0)
            how.append("shared")
            continue
        if input_ids is not None:
            raise StudyError(f"{ref} has another tokenizer than {refs[0]} and the sample was given as token ids, not "
                             "text: pass the text (data=...) so it can be re-tokenised for each model")
        if texts is None:
            texts = tok0.batch_decode(ids0)
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = min(len(r) for r in rows)
        if width < 2:
            raise StudyError(f"re-tokenising the sample for {ref} left a window of {width} token(s)")
        out.append(torch.tensor([r[:width] for r in rows], dtype=torch.long))
        how.append("retokenised")
    return out, sample, how


def compare_models(refs: list[str], out: str | Path, *, metrics=None, data=None, input_ids=None, num_samples: int = 8,
                   seq_len: int = 128, seed: int = 0, dtype: str | None = None, device: str = "cpu",
                   micro_batch_size: int = 8, cka: bool = True, overwrite: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    """Analyse every model in `refs` on one shared sample and write the comparison folder `out` (see module doc).

    The sample is `data` (text, as `calibration_sample` takes it) or, for models that share one tokenizer, the token
    ids `input_ids`.

    Everything is computed first and the folder is written at the end in one atomic step, so a bad model, tokenizer
    or metric name leaves nothing behind.
    """
    from depthlab.analysis.cka import linear_cka
    from depthlab.analysis.engine import Engine
    from depthlab.analysis.suite import analyze, resolve_metrics
    from depthlab.fileio import check_folder_target, dumps_json, write_folder
    from depthlab.loading import load_model, weights_hash

    if len(refs) < 2:
        raise StudyError("compare needs at least two models")
    names = resolve_metrics(list(COMPARE_METRICS) if metrics is None else metrics)
    check_folder_target(out, overwrite=overwrite)
    models = [load_model(r, device=device, dtype=dtype) for r in refs]
    ids, sample, how = shared_sample(models, refs, data=data, input_ids=input_ids, num_samples=num_samples,
                                     seq_len=seq_len, seed=seed)
    engines = [Engine(m, i, micro_batch_size=micro_batch_size) for (m, _), i in zip(models, ids)]  # validates ids
    results = [{k: v.to_dict() for k, v in analyze(m, i, names, micro_batch_size=micro_batch_size,
                                                    progress=progress).items()}
               for (m, _), i in zip(models, ids)]
    pairs = []
    if cka:
        for a in range(len(refs)):
            for b in range(a + 1, len(refs)):
                if how[a] == how[b] == "shared":
                    pairs.append({"a": a, "b": b, "matrix": linear_cka(engines[a], engines[b], progress)})
        for e in engines:
            e.release()
    comparison = {
        "models": [{"ref": str(r), "class": type(m).__name__, "n_layers": e.n_layers, "d_model": e.stack.d_model,
                    "weights_sha256": weights_hash(m), "tokenization": how_, "seq_len": int(i.shape[1])}
                   for r, (m, _), e, how_, i in zip(refs, models, engines, how, ids)],
        "sample": sample, "metrics": names, "results": results, "cka": pairs}

    def write(tmp: Path) -> None:
        (tmp / "compare.json").write_text(dumps_json(comparison, indent=1))
        (tmp / "compare_layers.csv").write_text(_layer_table(comparison))
        _plot_comparison(comparison, tmp)

    write_folder(out, write, overwrite=overwrite)
    return comparison


def _columns(comparison: dict) -> list[tuple[str, str]]:
    """(metric, column) pairs with one value per block, in metric order."""
    from depthlab.analysis.runner import _per_layer_columns

    found = []
    for name in comparison["metrics"]:
        for column in _per_layer_columns(name, comparison["results"][0][name]):
            found.append((name, column))
    return found


def _layer_table(comparison: dict) -> str:
    """One row per model and block: relative depth (l+1)/L and every per-layer column."""
    from depthlab.analysis.runner import _per_layer_columns

    cols = _columns(comparison)
    rows = [["model", "block", "relative_depth", *(f"{m}.{c}" for m, c in cols)]]
    for info, result in zip(comparison["models"], comparison["results"]):
        L = info["n_layers"]
        values = {(m, c): v for m in comparison["metrics"] for c, v in _per_layer_columns(m, result[m]).items()}
        for l in range(L):
            rows.append([info["ref"], l, round((l + 1) / L, 6), *(values[k][l] for k in cols)])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _plot_comparison(comparison: dict, out: Path) -> None:
    """compare_<metric>.png: each per-layer column of a metric, one line per model; cka_<a>_<b>.png heatmaps."""
    from depthlab.analysis.plots import _figure, _heatmap, _save
    from depthlab.analysis.runner import _per_layer_columns

    depths = {info["n_layers"] for info in comparison["models"]}
    relative = len(depths) > 1
    for name in comparison["metrics"]:
        columns = list(_per_layer_columns(name, comparison["results"][0][name]))[:4]
        if not columns:
            continue
        plt, fig, axes = _figure(len(columns))
        for ax, column in zip(axes, columns):
            for i, (info, result) in enumerate(zip(comparison["models"], comparison["results"])):
                values = _per_layer_columns(name, result[name])[column]
                L = info["n_layers"]
                x = [(l + 1) / L for l in range(L)] if relative else range(L)
                ax.plot(x, [float("nan") if v is None else float(v) for v in values], marker=".",
                        label=f"{chr(65 + i)}: {Path(info['ref']).name or info['ref']}")
            ax.set(title=f"{name}: {column}", xlabel="relative depth (l+1)/L" if relative else "block l")
        axes[0].legend(fontsize=7)
        _save(plt, fig, out / f"compare_{name}.png")
    for pair in comparison["cka"]:
        a, b = chr(65 + pair["a"]), chr(65 + pair["b"])
        _heatmap(out / f"cka_{a}_{b}.png", pair["matrix"], f"linear CKA, {a} (rows) vs {b} (columns)",
                 f"{b}: state h_j", f"{a}: state h_i")


def format_model_comparison(c: dict[str, Any]) -> str:
    """The models, how each read the sample, and for every CKA pair the best-matching layer of B per layer of A."""
    lines = [f"{chr(65 + i)}: {m['ref']} ({m['class']}, {m['n_layers']} blocks, d={m['d_model']}, "
             f"{m['tokenization']} tokens x {m['seq_len']})" for i, m in enumerate(c["models"])]
    lines.append(f"sample: {c['sample']['num_samples']} windows from {c['sample'].get('source')}; "
                 f"metrics: {', '.join(c['metrics'])}")
    for pair in c["cka"]:
        a, b = chr(65 + pair["a"]), chr(65 + pair["b"])
        best = [max(range(len(row)), key=lambda j, row=row: -1 if row[j] is None else row[j]) for row in pair["matrix"]]
        lines.append(f"CKA {a}→{b}: best match of each state h_0..h_L of {a} in {b}: {best}")
    skipped = [i for i, m in enumerate(c["models"]) if m["tokenization"] != "shared"]
    if skipped:
        lines.append("no CKA for " + ", ".join(chr(65 + i) for i in skipped) + " (another tokenizer: its tokens do "
                     "not align with the others')")
    return "\n".join(lines)
