"""`run_analysis`: what `depthlab analyze` does — load, sample, measure, save resumably, plot, summarise.

Every finished metric is written atomically to ``metrics/<name>.json`` and merged into ``results.json`` at once, so an
interrupted run keeps its work; a rerun with the same model weights, token sample and settings skips what is done.
A metric that fails is recorded under ``errors`` and the others still run; the run then ends with an AnalysisError.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path

import torch

from depthlab import __version__
from depthlab.analysis.defaults import CLI_METRICS, CLI_OPTIONS, NEAR_IDENTITY_ANGLE
from depthlab.analysis.results import to_jsonable
from depthlab.errors import AnalysisError
from depthlab.fileio import atomic_write_text


def run_analysis(model: str, out_dir: str | Path, *, metrics=None, data: str | None = None, num_samples: int = 8,
                 seq_len: int = 128, seed: int = 0, dtype: str | None = None, micro_batch_size: int = 8,
                 options: dict | None = None, progress: bool = True, device: str = "cpu",
                 log=print) -> dict:
    """Analyse `model` (anything `load_model` accepts) on a seeded calibration sample and write `out_dir`.

    Returns the results dict written to results.json. `metrics` None means CLI_METRICS (dense models skip moe).
    """
    from depthlab.analysis.suite import METRICS, resolve_metrics
    from depthlab.data import calibration_sample
    from depthlab.loading import load_model, weights_hash

    explicit = metrics is not None and metrics != "default"
    if metrics == "all":
        names = list(METRICS)
    else:
        names = resolve_metrics(metrics) if explicit else list(CLI_METRICS)
    opts = {k: dict(v) for k, v in CLI_OPTIONS.items()}
    for k, v in (options or {}).items():
        opts.setdefault(k, {}).update(v)
    _check_options(opts)
    dtype = dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    net, tokenizer = load_model(model, device=device, dtype=dtype)
    ids, sample = calibration_sample(tokenizer, text=data, num_samples=num_samples, seq_len=seq_len, seed=seed)

    from depthlab.analysis.engine import Engine

    engine = Engine(net, ids, micro_batch_size=micro_batch_size)  # validates ids against the model first
    if "moe" in names and not explicit and engine.stack.router(0) is None:
        names.remove("moe")
    identity = {"model": {"ref": str(model), "class": type(net).__name__, "weights_sha256": weights_hash(net),
                          "n_layers": engine.n_layers, "d_model": engine.stack.d_model},
                "sample": sample,
                "settings": {"num_samples": num_samples, "seq_len": seq_len, "seed": seed, "dtype": dtype,
                             "data": data, "micro_batch_size": micro_batch_size, "options": opts},
                "versions": {"depthlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                             "transformers": _version("transformers")}}
    out = Path(out_dir)
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    results = _resume(out, identity)
    results.update(identity)
    results.setdefault("metrics", {})
    results["errors"] = {}
    for name in names:
        if name in results["metrics"]:
            log(f"{name}: already done, skipped")
            continue
        shared = {"progress": progress} if name in ("weight_sparsity", "attention_sparsity") else {
            "engine": engine, "progress": progress}
        start = time.perf_counter()
        try:
            value = METRICS[name](net, ids, **shared, **opts.get(name, {})).to_dict()
        except AnalysisError as e:
            results["errors"][name] = str(e)
            log(f"{name}: failed: {e}")
            continue
        value["seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_text(out / "metrics" / f"{name}.json", json.dumps(value))
        results["metrics"][name] = value
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        log(f"{name}: done in {value['seconds']:.1f}s")
    engine.release()
    results["summary"] = summarize(results["metrics"], engine.n_layers)
    atomic_write_text(out / "results.json", json.dumps(to_jsonable(results), indent=1))
    _write_tables(out, results["metrics"])
    from depthlab.analysis.plots import plot_result

    for name, value in results["metrics"].items():
        plot_result(name, value, out)
    if results["errors"]:
        failed = ", ".join(f"{k} ({v})" for k, v in results["errors"].items())
        raise AnalysisError(f"metrics failed: {failed}; the others are saved in {out}")
    return results


def _check_options(options: dict[str, dict]) -> None:
    """Unknown metrics or option names are input errors, reported before any work starts."""
    import inspect

    from depthlab.analysis.suite import METRICS

    for metric, values in options.items():
        if metric not in METRICS:
            raise AnalysisError(f"option for unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        params = inspect.signature(METRICS[metric]).parameters
        allowed = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p not in ("engine", "progress")]
        for key in values:
            if key not in allowed:
                raise AnalysisError(f"{metric} has no option {key!r}; options: {', '.join(allowed)}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _resume(out: Path, identity: dict) -> dict:
    """Finished metrics of a previous run into `out` with the same model, sample and settings (else nothing)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # torn by a kill: recompute
    if not (isinstance(previous, dict) and all(isinstance(previous.get(k, {}), dict) for k in ("model", "sample"))):
        raise AnalysisError(f"{path} is not a depthlab results file (it holds a JSON {type(previous).__name__}): "
                            "choose another --out rather than overwrite it")
    same = (previous.get("model", {}).get("weights_sha256") == identity["model"]["weights_sha256"]
            and previous.get("sample", {}).get("token_sha256") == identity["sample"].get("token_sha256")
            and previous.get("settings") == to_jsonable(identity["settings"]))
    return {"metrics": previous.get("metrics", {})} if same else {}


def summarize(metrics: dict, n_layers: int) -> dict:
    """Effective depth, near-identity blocks and the most prunable windows, from whichever metrics ran."""
    summary: dict = {"n_layers": n_layers}
    if "usefulness" in metrics:
        u = metrics["usefulness"]
        summary["effective_depth"] = sum(u["useful"])
        summary["useful_blocks"] = [i for i, x in enumerate(u["useful"]) if x]
        summary["usefulness_score"] = u["score"]
    if "angular" in metrics:
        a = metrics["angular"]
        summary["near_identity_blocks"] = [i for i, x in enumerate(a["angular_distance"])
                                           if x < NEAR_IDENTITY_ANGLE]
        n = max(1, n_layers // 4)
        summary["most_prunable_window"] = a["best_windows"][n - 1]
    for key, field in (("causal", "mean_effect"), ("permutation", "mean_score")):
        if key in metrics:
            summary[f"{key}_{field}"] = metrics[key][field]
    return summary


def format_summary(results: dict) -> str:
    s = results["summary"]
    sample = results["sample"]
    lines = [f"model {results['model']['ref']} ({s['n_layers']} blocks), "
             + f"{sample['num_samples']}x{sample['seq_len']} tokens"]
    if "effective_depth" in s:
        lines.append(f"effective depth: {s['effective_depth']} of {s['n_layers']} blocks useful "
                     f"(usefulness {s['usefulness_score']:.3f}); useful: {s['useful_blocks']}")
    if "near_identity_blocks" in s:
        w = s["most_prunable_window"]
        lines.append(f"near-identity blocks (angular distance < {NEAR_IDENTITY_ANGLE}): {s['near_identity_blocks']}")
        lines.append(f"most prunable {w['n']}-block window: blocks {w['start']}..{w['start'] + w['n'] - 1} "
                     f"(angular distance {w['distance']:.3f})")
    if "causal_mean_effect" in s:
        lines.append(f"causal effect (mean of upper triangle): {s['causal_mean_effect']:.3f}")
    if "permutation_mean_score" in s:
        lines.append(f"permutation score (mean over pairs): {s['permutation_mean_score']:.4f}")
    return "\n".join(lines)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _write_tables(out: Path, metrics: dict) -> None:
    """A per-layer CSV per metric, plus the matrices (causal, permutation) and per-matrix weight rows."""
    for name, value in metrics.items():
        columns = _per_layer_columns(name, value)
        if columns:
            keys = list(columns)
            n = len(next(iter(columns.values())))
            rows = [["layer", *keys]] + [[i, *(columns[k][i] for k in keys)] for i in range(n)]
            atomic_write_text(out / f"{name}.csv", _csv(rows))
        if name in ("causal", "permutation"):
            atomic_write_text(out / f"{name}_matrix.csv", _csv(value["matrix"]))
        if name == "weight_sparsity":
            keys = [k for k in value["matrices"][0] if k != "histogram"]
            atomic_write_text(out / "weight_sparsity_matrices.csv",
                         _csv([keys] + [[r[k] for k in keys] for r in value["matrices"]]))


def _per_layer_columns(name: str, value: dict) -> dict[str, list]:
    keys = {"variance": ("out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm", "stream_norm",
                         "relative_update"),
            "angular": ("angular_distance", "block_influence"),
            "usefulness": ("loss_ratios", "useful", "replaced_losses"),
            "causal": ("per_skip_mean",),
            "weight_sparsity": ("per_layer_hoyer",),
            "attention_sparsity": ("layer_entropy", "layer_normalized_entropy", "layer_effective_support"),
            "moe": ("imbalance", "balance", "router_entropy", "branch_importance"),
            "lens": ("kl", "top1_agreement", "target_logprob", "target_rank", "entropy"),
            "tuned_lens": ("kl", "logit_kl", "top1_agreement", "target_logprob", "target_rank", "entropy"),
            "branches": ("attn_removed", "ffn_removed", "attn_affine", "ffn_affine", "attn_causal_mean",
                         "ffn_causal_mean")}.get(name, ())
    if name == "jacobian":
        return {k: [r.get(k) for r in value["layers"]] for k in value["layers"][0]}
    return {k: value[k] for k in keys}
