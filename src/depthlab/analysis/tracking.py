"""Depth use over training: the same metrics on every checkpoint of a run, on one fixed sample.

`depthlab analyze RUN --checkpoints all|STEPS` resolves the checkpoints of

* a depthlab run folder: ``RUN/checkpoints/step_N`` (the trainer keeps the newest ``trainer.keep_last`` plus every
  multiple of ``trainer.keep_every``), STEPS being step numbers;
* any other folder of model folders — e.g. a series of intermediate checkpoints of one model saved by the HF
  Trainer (``checkpoint-500/``, ``checkpoint-1000/``) or downloaded revisions — each subfolder that
  `depthlab.load_model` opens (has a ``config.json`` or a depthlab checkpoint), ordered by the number at the end of
  its name; STEPS then names subfolders.

The sample is drawn once, with the first checkpoint's tokenizer (from the run's own held-out text for a depthlab
run), and every checkpoint is analysed on exactly those token ids, so differences between steps are differences of
the model. Each checkpoint's result is written to ``checkpoints/<folder name>.json`` as it finishes and reused on a
rerun when its weights hash, the sample and the metrics match. The per-step table ``tracking.csv`` holds one scalar per
metric (usefulness score, mean angular distance, mean lens KL over blocks, causal mean effect, ...);
``tracking.png`` plots them against the step, and ``tracking_<metric>.png`` is a heatmap of the metric's main
per-layer column over steps × blocks.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from depthlab.errors import AnalysisError

TRACK_METRICS = ("usefulness", "angular", "lens", "causal")
"""What tracking measures by default: the paper's three views of depth use plus where predictions settle."""
SCALARS = {"usefulness": ("score", None), "angular": ("angular_distance", "mean"), "lens": ("kl", "mean"),
           "tuned_lens": ("kl", "mean"), "causal": ("mean_effect", None), "permutation": ("mean_score", None),
           "variance": ("out_var", "last"), "branches": ("attn_removed", "mean")}
"""metric → (field, reduction) giving the one number per checkpoint in tracking.csv (None: the field is scalar)."""
HEATMAPS = {"usefulness": "loss_ratios", "angular": "angular_distance", "lens": "kl", "tuned_lens": "kl",
            "causal": "per_skip_mean", "variance": "out_var", "branches": "attn_removed"}
"""metric → the per-layer field drawn as a steps × blocks heatmap."""


def resolve_checkpoints(model: str | Path, checkpoints: str) -> list[tuple[int, Path]]:
    """(step, folder) of the chosen checkpoints, oldest first; a folder with none, or unknown STEPS, is an error."""
    from depthlab import checkpoint as ckpt
    from depthlab.rundir import RunDir

    root = Path(model)
    if not root.is_dir():
        raise AnalysisError(f"--checkpoints needs a run folder or a folder of model folders; {root} is not a folder")
    run = RunDir(root)
    is_run = run.checkpoints_dir.is_dir() or run.started()
    if is_run:
        found = [(ckpt.checkpoint_step(p), p) for p in run.checkpoints()]
        what = f"run {root} has no complete checkpoints"
    else:
        subs = [p for p in root.iterdir() if p.is_dir() and ((p / "config.json").is_file() or RunDir(p).started())]
        found = sorted(((_trailing_number(p.name), p) for p in subs), key=lambda x: (x[0], x[1].name))
        what = f"{root} holds no model folders (subfolders with a config.json)"
    if not found:
        raise AnalysisError(what)
    if checkpoints == "all":
        return found
    wanted = [w.strip() for w in str(checkpoints).split(",") if w.strip()]
    if not wanted:
        raise AnalysisError("--checkpoints expects 'all' or a comma-separated list of steps")
    chosen = []
    for w in wanted:
        match = [c for c in found if c[1].name == w or (w.isdigit() and c[0] == int(w))]
        if not match:
            have = ", ".join(str(s) if is_run else p.name for s, p in found)
            raise AnalysisError(f"no checkpoint {w!r} in {root}; available: {have}")
        chosen.append(match[0])
    return sorted(dict.fromkeys(chosen))


def _trailing_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else -1


def track_checkpoints(model: str | Path, out: str | Path, *, checkpoints: str = "all", metrics=None,
                      data: str | None = None, num_samples: int = 8, seq_len: int = 128, seed: int = 0,
                      dtype: str | None = None, device: str = "cpu", micro_batch_size: int = 8,
                      options: dict | None = None, progress: bool = False, log=print) -> dict:
    """Analyse each chosen checkpoint of `model` on one fixed sample; write the per-step table and figures."""
    from depthlab.analysis.suite import analyze, resolve_metrics
    from depthlab.data import calibration_sample, run_heldout
    from depthlab.fileio import atomic_write_text, check_out, dumps_json
    from depthlab.loading import load_model, weights_hash

    names = resolve_metrics(list(TRACK_METRICS) if metrics is None else metrics)
    chosen = resolve_checkpoints(model, checkpoints)
    out = check_out(out)
    ids = sample = None
    rows = []
    for step, folder in chosen:
        net, tokenizer = load_model(folder, device=device, dtype=dtype)
        if ids is None:
            heldout = data if data is not None else run_heldout(net)[0]
            ids, sample = calibration_sample(tokenizer, text=heldout, num_samples=num_samples, seq_len=seq_len,
                                             seed=seed)
        key = {"weights_sha256": weights_hash(net), "token_sha256": sample["token_sha256"], "metrics": names,
               "options": options or {}}
        path = out / "checkpoints" / f"{folder.name}.json"
        previous = _read(path)
        if previous is not None and previous.get("key") == key:
            log(f"step {step}: already done, skipped")
            rows.append(previous)
            continue
        results = analyze(net, ids, names, options=options, micro_batch_size=micro_batch_size, progress=progress)
        row = {"step": step, "ref": str(folder), "key": key, "metrics": {k: v.to_dict() for k, v in results.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)  # only once a checkpoint is done: bad input writes nothing
        atomic_write_text(path, dumps_json(row))
        rows.append(row)
        log(f"step {step}: done")
    tracking = {"model": str(model), "sample": sample, "metrics": names, "checkpoints": rows}
    atomic_write_text(out / "tracking.json", dumps_json(tracking, indent=1))
    atomic_write_text(out / "tracking.csv", _table(tracking))
    plot_tracking(tracking, out)
    return tracking


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def scalar(name: str, value: dict) -> float | None:
    """The one number per checkpoint that tracking.csv holds for metric `name` (see SCALARS)."""
    if name not in SCALARS:
        return None
    field, how = SCALARS[name]
    v = value.get(field)
    if how is None:
        return v
    finite = [x for x in (v or []) if x is not None]
    if how == "last":
        return finite[-1] if finite else None
    return sum(finite) / len(finite) if finite else None


def _table(tracking: dict) -> str:
    cols = [n for n in tracking["metrics"] if n in SCALARS]
    rows = [["step", *(f"{n}.{SCALARS[n][0]}" + ("" if SCALARS[n][1] is None else f".{SCALARS[n][1]}")
                       for n in cols)]]
    rows += [[r["step"], *(scalar(n, r["metrics"][n]) for n in cols)] for r in tracking["checkpoints"]]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def plot_tracking(tracking: dict, out: Path) -> list[Path]:
    """tracking.png (each metric's scalar vs step) and tracking_<metric>.png (steps × blocks heatmaps)."""
    import numpy as np

    from depthlab.analysis.plots import _figure, _save

    written = []
    rows = tracking["checkpoints"]
    steps = [r["step"] for r in rows]
    cols = [n for n in tracking["metrics"] if n in SCALARS]
    if cols:
        plt, fig, axes = _figure(len(cols))
        for ax, name in zip(axes, cols):
            ax.plot(steps, [np.nan if (v := scalar(name, r["metrics"][name])) is None else v for r in rows],
                    marker="o")
            ax.set(xlabel="training step", title=f"{name}: {SCALARS[name][0]}"
                   + ("" if SCALARS[name][1] is None else f" ({SCALARS[name][1]} over blocks)"))
        written.append(out / "tracking.png")
        _save(plt, fig, written[-1])
    for name in tracking["metrics"]:
        field = HEATMAPS.get(name)
        if field is None:
            continue
        data = np.array([[np.nan if v is None else float(v) for v in r["metrics"][name][field]] for r in rows])
        plt, fig, (ax,) = _figure()
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", origin="lower")
        ax.set_yticks(range(len(steps)), [str(s) for s in steps])
        fig.colorbar(im, ax=ax)
        ax.set(title=f"{name}: {field}", xlabel="block l", ylabel="training step")
        written.append(out / f"tracking_{name}.png")
        _save(plt, fig, written[-1])
    return written


def format_tracking(tracking: dict) -> str:
    """The per-step table as aligned text."""
    rows = list(csv.reader(io.StringIO(_table(tracking))))
    fmt = [[c if i == 0 or not c else f"{float(c):.4g}" for i, c in enumerate(r)] if k else r
           for k, r in enumerate(rows)]
    widths = [max(len(r[i]) for r in fmt) for i in range(len(fmt[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in fmt)
