"""`run_analysis`: what `depthlab analyze` does — load, sample, measure, save resumably, plot, summarise.

The metrics run through `analyze` (the one metric loop); this module adds the provenance (model, samples, settings,
versions, and `depthlab.provenance`'s date, command, device, dtype and model origin). Every finished metric is
written atomically to ``metrics/<name>.json`` and merged into ``results.json`` at once, so an interrupted run keeps
its work; a rerun with the same model weights, token samples and settings skips what is done. A metric that fails
is recorded under ``errors`` and the others still run; the run then ends with an AnalysisError.

Before the baseline pass, `plan_memory` compares a rough estimate with the state device's available memory (e the
element size of the model's dtype, B the micro-batch, N this rank's sequences of T tokens, L blocks of width d with
h heads, vocabulary V):

    states  S = e·T·d·(L+1 + 2L if variance runs) + 4·(T−1)   one sequence's cached baseline: h_0..h_L, the
                                                             branch outputs variance asks for, the fp32 NLL
                                                             (computed and kept once a metric scores losses)
    work    = weights + B·S + e·B·T·(16·d + h·T + L·d) + 4·B·T·V
                                                             resident weights, one micro-batch's states and
                                                             block intermediates (FFN, attention probabilities),
                                                             the L streams of interventions resumed side by side
                                                             (`Engine.resume_many`), its logits
    cache   = N·S, kept while it fits --cache-budget

A working set beyond the memory available (plus the weights, already loaded) is refused in one line before anything
is computed or written; a cache beyond the budget, or beyond what the working set leaves, is said once and capped
there: the states past the cap are recomputed for each metric (identical results, slower).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from depthlab.analysis.defaults import NEAR_IDENTITY_ANGLE, default_fit_samples
from depthlab.analysis.results import to_jsonable
from depthlab.errors import AnalysisError
from depthlab.fileio import atomic_write_text, dumps_json
from depthlab.precision import device_memory, human_bytes
from depthlab.provenance import peak_memory, provenance, versions

BRANCH_STATE_METRICS = ("variance",)
"""Metrics whose baselines also hold every block's branch outputs (``Engine.baselines(branches=True)``)."""


def run_analysis(model: str, out_dir: str | Path, *, metrics=None, data: str | None = None, num_samples: int = 8,
                 seq_len: int = 128, fit_samples: int | None = None, fit_seq_len: int | None = None, seed: int = 0,
                 dtype: str | None = None, micro_batch_size: int = 8, options: dict | None = None,
                 progress: bool = True, device: str = "cpu", device_map=None, max_memory: dict | None = None,
                 offload_folder: str | None = None, cache_budget: int | str = "2GiB", data_parallel: bool = False,
                 log=print) -> dict:
    """Analyse `model` (anything `load_model` accepts) on a seeded held-out sample and write `out_dir`.

    num_samples x seq_len tokens are evaluated; the usefulness maps are fitted on a disjoint fit sample of
    fit_samples x fit_seq_len tokens (defaults: seq_len, and enough sequences for FIT_TOKENS_PER_COEF·(d+1) tokens
    per map, capped at MAX_FIT_TOKENS). data None means the held-out text of the model's own training run when it
    is a depthlab run, else the held-out Shakespeare plays. device_map / max_memory / offload_folder place the model
    with accelerate (see `load_model`); cache_budget (bytes, or "2GiB") bounds the cached baseline states, beyond
    which they are recomputed. data_parallel: split the sequences over the torch.distributed ranks (torchrun).
    dtype None: bf16 on CUDA, fp32 on every CPU, native bf16 units or not, so that the study runner's measurements
    compare across CPU types (the CLI's --dtype auto picks bf16 on such CPUs).
    Returns the results dict written to results.json (with the run's peak memory).
    """
    from depthlab.analysis.engine import check_data_parallel, data_parallel_world, validate_ids
    from depthlab.analysis.suite import FITTED_METRICS, analyze, resolve_metrics, resolve_options
    from depthlab.data import calibration_samples, run_heldout
    from depthlab.loading import load_model, weights_hash
    from depthlab.model.view import ModelView

    names = resolve_metrics(metrics)
    opts = resolve_options(options)
    world = data_parallel_world()[1] if data_parallel else 1
    fits = fit_samples if any(name in FITTED_METRICS for name in names) else None
    check_data_parallel(names, num_samples, world, fits)  # before loading or writing anything
    if fit_samples is not None and fit_samples < 1:
        raise AnalysisError(f"--fit-samples must be >= 1, got {fit_samples}")
    if fit_seq_len is not None and fit_seq_len < 2:
        raise AnalysisError(f"--fit-seq-len must be >= 2, got {fit_seq_len}")
    from depthlab.model.dispatch import parse_size

    cache_bytes = parse_size(cache_budget, "cache budget")
    dtype = dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    net, tokenizer = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                offload_folder=offload_folder)
    view = ModelView(net)
    heldout, disjoint = (data, None) if data is not None else run_heldout(net)
    fit_seq_len = fit_seq_len or seq_len
    fitting = any(name in FITTED_METRICS for name in names)
    if fitting and fit_samples is None:
        fit_samples = default_fit_samples(view.d_model, fit_seq_len)
    ids, fit_ids, sample = calibration_samples(tokenizer, heldout, num_samples, seq_len,
                                               fit_samples if fitting else 0, fit_seq_len, seed=seed)
    sample["disjoint_from_training"] = disjoint
    for sampled in (ids, fit_ids):  # bad samples are reported before anything is written
        if sampled is not None:
            validate_ids(sampled, view)
    cache_bytes = plan_memory(net, view, -(-ids.shape[0] // world), seq_len, micro_batch_size, cache_bytes,
                              branches=any(name in BRANCH_STATE_METRICS for name in names), log=log)
    identity = {"model": {"ref": str(model), "class": type(net).__name__, "weights_sha256": weights_hash(net),
                          "n_layers": view.n_layers, "d_model": view.d_model},
                "sample": sample,
                "settings": {"num_samples": num_samples, "seq_len": seq_len, "seed": seed, "dtype": dtype,
                             "fit_samples": fit_samples if fitting else None,
                             "fit_seq_len": fit_seq_len if fitting else None, "data": data,
                             "micro_batch_size": micro_batch_size, "options": opts},
                "versions": versions()}
    out = Path(out_dir)
    results = _resume(out, identity)  # before creating anything: it refuses a folder that is not an analysis's
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    results.update(identity)
    results["provenance"] = provenance(net, device=device if device_map is None else "device_map", dtype=dtype)
    results["provenance"]["data_parallel_ranks"] = world
    if device_map is not None:
        results["provenance"]["device_map"] = getattr(net, "hf_device_map", device_map)
    results.setdefault("metrics", {})
    results["errors"] = {}
    done = [name for name in names if name in results["metrics"]]
    for name in done:
        log(f"{name}: already done, skipped")
    clock = [time.perf_counter()]

    def on_result(name, result):
        value = result.to_dict()
        value["seconds"] = round(time.perf_counter() - clock[0], 2)
        atomic_write_text(out / "metrics" / f"{name}.json", dumps_json(value))
        results["metrics"][name] = value
        results["provenance"]["memory"] = peak_memory()
        atomic_write_text(out / "results.json", dumps_json(results, indent=1))
        log(f"{name}: done in {value['seconds']:.1f}s")
        if value.get("reliable") is False:
            log(f"warning: {name} is unreliable: {value['reason']}")
        clock[0] = time.perf_counter()

    def on_error(name, error):
        results["errors"][name] = str(error)
        log(f"{name}: failed: {error}")
        clock[0] = time.perf_counter()

    if "tuned_lens" in names:  # translators cached beside the results, so a rerun reuses them
        cached = {"translators": str(out / "tuned_lens.safetensors")}
        opts = {**opts, "tuned_lens": {**cached, **opts.get("tuned_lens", {})}}
    analyze(net, ids, metrics, fit_ids=fit_ids, options=opts, micro_batch_size=micro_batch_size,
            cache_budget_mb=cache_bytes / 2**20, data_parallel=data_parallel, progress=progress, skip=done, on_result=on_result,
            on_error=on_error)
    results["provenance"]["memory"] = peak_memory()
    results["summary"] = summarize(results["metrics"], view.n_layers)
    atomic_write_text(out / "results.json", dumps_json(to_jsonable(results), indent=1))
    _write_tables(out, results["metrics"])
    from depthlab.analysis.plots import plot_result

    for name, value in results["metrics"].items():
        plot_result(name, value, out)
    if results["errors"]:
        failed = ", ".join(f"{k} ({v})" for k, v in results["errors"].items())
        raise AnalysisError(f"metrics failed: {failed}; the others are saved in {out}")
    return results


def plan_memory(net, view, num_sequences: int, seq_len: int, micro_batch_size: int, cache_bytes: int, *,
                branches: bool, log=print) -> int:
    """The cache cap to run with: `cache_bytes`, or less when the cached states would not fit next to the working
    set (said once through `log`); a one-line AnalysisError when the working set itself cannot fit (module docstring
    has the estimate)."""
    from depthlab.model.dispatch import execution_device

    device = execution_device(net if view.embedding is None else view.embedding)
    e = next(net.parameters()).element_size()
    T, d, L, B = seq_len, view.d_model, view.n_layers, min(micro_batch_size, num_sequences)
    per_sequence = e * T * d * (L + 1 + (2 * L if branches else 0)) + 4 * (T - 1)
    weights = sum(p.numel() * p.element_size() for p in net.parameters() if p.device.type == device.type)
    work = (weights + B * per_sequence + e * B * T * (16 * d + (view.n_heads or 1) * T + L * d)
            + 4 * B * T * view.vocab_size)
    available = device_memory(device)[1]
    if available is None:
        return cache_bytes
    have = available + weights  # the weights are loaded already: what `available` lacks of them is theirs
    if work > have:
        raise AnalysisError(f"analysis needs about {human_bytes(work)} on {device} ({human_bytes(weights)} of weights and "
                            f"{human_bytes(work - weights)} for one micro-batch of {B}x{T} tokens) but {human_bytes(have)} is "
                            "available: lower --micro-batch-size (or --num-samples, --seq-len), or offload the "
                            "model with --device-map auto --offload-folder DIR")
    cache = num_sequences * per_sequence
    cap = min(cache_bytes, have - work)
    if cache > cap:
        why = "--cache-budget" if cap == cache_bytes else "the memory left next to the working set"
        log(f"cache: the baseline states of {num_sequences}x{T} tokens need about {human_bytes(cache)}, {why} allows "
            f"{human_bytes(cap)}: states beyond it are recomputed for each metric")
    return cap


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
        summary["undecided_blocks"] = u.get("undecided", [])
        summary["usefulness_score"] = u["score"]
        summary["usefulness_fit_tokens"] = u.get("fit_tokens")
        summary["usefulness_reliable"] = u.get("reliable")
        summary["usefulness_reason"] = u.get("reason")
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
                     f"(usefulness {s['usefulness_score']:.3f}, maps fitted on {s['usefulness_fit_tokens']} "
                     f"tokens); useful: {s['useful_blocks']}")
        if s.get("undecided_blocks"):
            confidence = results["metrics"]["usefulness"]["confidence"]
            lines.append(f"undecided (the {confidence:.0%} interval of the loss ratio contains the threshold; "
                         f"more --num-samples narrows it): {s['undecided_blocks']}")
        if s.get("usefulness_reliable") is False:
            lines.append(f"warning: usefulness is unreliable: {s['usefulness_reason']}")
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
