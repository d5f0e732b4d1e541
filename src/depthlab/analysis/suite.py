"""`analyze`: run several metrics on one model and one token sample, sharing the engine's cached baseline."""

from __future__ import annotations

from collections.abc import Callable

from depthlab.analysis.branches import branch_effects
from depthlab.analysis.engine import Engine
from depthlab.analysis.interventions import causal_effects, permutation_scores
from depthlab.analysis.jacobians import jacobian
from depthlab.analysis.lens import logit_lens, tuned_lens
from depthlab.analysis.moe import moe_stats
from depthlab.analysis.profiles import angular_distance, variance_profile
from depthlab.analysis.replacement import usefulness
from depthlab.analysis.results import Result
from depthlab.analysis.sparsity import attention_sparsity, weight_sparsity
from depthlab.errors import AnalysisError

METRICS: dict[str, Callable] = {
    "variance": variance_profile,
    "angular": angular_distance,
    "usefulness": usefulness,
    "causal": causal_effects,
    "permutation": permutation_scores,
    "jacobian": jacobian,
    "weight_sparsity": weight_sparsity,
    "attention_sparsity": attention_sparsity,
    "moe": moe_stats,
    "lens": logit_lens,
    "tuned_lens": tuned_lens,
    "branches": branch_effects,
}
"""Metric name → public function. Every function takes (model, input_ids, **options) and returns a Result."""

DEFAULT_METRICS = ("variance", "angular", "usefulness", "causal", "permutation", "jacobian", "weight_sparsity",
                   "attention_sparsity", "moe")
ENGINE_FREE = {"weight_sparsity", "attention_sparsity"}  # read weights or run their own instrumented pass


def resolve_metrics(metrics) -> list[str]:
    """A list of names, a comma-separated string, or "all" → validated metric names in the given order."""
    if metrics is None or metrics == "all":
        return list(DEFAULT_METRICS)
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise AnalysisError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)} or 'all'")
    if not names:
        raise AnalysisError("no metrics given")
    return list(dict.fromkeys(names))


def analyze(model, input_ids, metrics=None, *, options: dict[str, dict] | None = None, micro_batch_size: int = 8,
            cache_budget_mb: float = 2048.0, progress: bool = False,
            on_result: Callable[[str, Result], None] | None = None) -> dict[str, Result]:
    """Run `metrics` (default: all that apply) and return {name: result}.

    `options` holds per-metric keyword arguments, e.g. ``{"usefulness": {"tau": 0.2}}``. The baseline is computed
    once and shared while it fits `cache_budget_mb`. `on_result(name, result)` is called as each metric finishes
    (the CLI saves it there, so an interrupted run keeps finished metrics). ``moe`` is skipped for dense models
    when it was not asked for explicitly.
    """
    names = resolve_metrics(metrics)
    options = options or {}
    engine = Engine(model, input_ids, micro_batch_size=micro_batch_size, cache_budget_mb=cache_budget_mb)
    if metrics in (None, "all") and engine.stack.router(0) is None:
        names.remove("moe")
    results = {}
    for name in names:
        shared = {"progress": progress} if name in ENGINE_FREE else {"engine": engine, "progress": progress}
        results[name] = METRICS[name](model, input_ids, **shared, **options.get(name, {}))
        if on_result is not None:
            on_result(name, results[name])
    engine.release()
    return results
