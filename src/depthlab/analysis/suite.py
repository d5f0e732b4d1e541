"""`analyze`: the one metric loop — several metrics on one model and one token sample, sharing one engine.

`depthlab analyze` (`analysis.runner`), the studies and `depthlab doctor` all run their metrics through it; the
runner adds provenance and saves each result from `on_result`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from depthlab.analysis.branches import branch_effects
from depthlab.analysis.defaults import DEFAULT_METRICS, DEFAULT_OPTIONS
from depthlab.analysis.engine import Engine, check_data_parallel
from depthlab.analysis.interventions import causal_effects, check_pairs, permutation_scores
from depthlab.analysis.jacobians import jacobian
from depthlab.analysis.lens import logit_lens, tuned_lens
from depthlab.analysis.moe import moe_stats
from depthlab.analysis.profiles import angular_distance, variance_profile
from depthlab.analysis.replacement import usefulness
from depthlab.analysis.results import Result
from depthlab.analysis.sparsity import attention_sparsity, weight_sparsity
from depthlab.config import Bound
from depthlab.errors import AnalysisError, ConfigError

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
"""Metric name → public function ``(model, input_ids, *, engine=None, progress=False, **options) -> Result``."""
FITTED_METRICS = ("usefulness", "branches")
"""Metrics that fit affine maps and take the separate fit sample (``fit_ids``)."""


def resolve_metrics(metrics) -> list[str]:
    """None or "default" (DEFAULT_METRICS), "all" (every metric), a list of names or a comma-separated string →
    validated metric names in the given order."""
    if metrics is None or metrics == "default":
        return list(DEFAULT_METRICS)
    if metrics == "all":
        return list(METRICS)
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise AnalysisError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}, 'default' or 'all'")
    if not names:
        raise AnalysisError("no metrics given")
    return list(dict.fromkeys(names))


def resolve_options(options: dict[str, dict] | None) -> dict[str, dict]:
    """DEFAULT_OPTIONS overridden by `options`; unknown metrics or option names are input errors."""
    merged = {k: dict(v) for k, v in DEFAULT_OPTIONS.items()}
    for metric, values in (options or {}).items():
        if metric not in METRICS:
            raise AnalysisError(f"option for unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        params = inspect.signature(METRICS[metric]).parameters
        allowed = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p not in ("engine", "progress")]
        for key, value in values.items():
            if key not in allowed:
                raise AnalysisError(f"{metric} has no option {key!r}; options: {', '.join(allowed)}")
            _check_option(f"{metric}.{key}", value, params[key].default)
        merged.setdefault(metric, {}).update(values)
    return merged


FORM_CHECKS: dict[str, Callable] = {"permutation.pairs": check_pairs}
"""Options whose values take several forms (not only their default's type), checked by the metric's own rule."""
_POSITIVE, _NON_NEGATIVE = Bound(0, lo_open=True), Bound(0)
OPTION_BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(("micro_batch_size", "cache_budget_mb", "folds", "probes", "steps", "batch_tokens",
                     "probe_sequences", "lr", "abs_eps"), _POSITIVE),
    **dict.fromkeys(("tau", "bootstrap", "power_iters", "seed"), _NON_NEGATIVE),
    "confidence": Bound(0, 1, lo_open=True),
}
"""The valid range of an option wherever a metric has it (`depthlab.config.Bound`, like the config fields): sizes,
counts and rates positive; bootstrap=0 and power_iters=0 are valid (no intervals, no power iteration: doctor and
prune use them)."""


def _check_option(name: str, value, default) -> None:
    """An option value must have its default's type (an int is fine for a float), be finite, and be positive for the
    ranges in OPTION_BOUNDS; options in FORM_CHECKS by their check, options whose default is None or a
    tuple by the metric."""
    import math

    if name in FORM_CHECKS:
        try:
            FORM_CHECKS[name](value)
        except AnalysisError as e:
            raise AnalysisError(f"option {name}: {e}") from None
        return
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise AnalysisError(f"option {name}: expected a{' finite' if kind is float else 'n' if kind is int else ''} "
                            f"{kind.__name__}, got {value!r}")
    bound = OPTION_BOUNDS.get(name.split(".")[-1])
    if bound is not None and kind in (int, float):
        try:
            bound.check(f"option {name}", value)
        except ConfigError as e:
            raise AnalysisError(str(e)) from None


def analyze(model, input_ids, metrics=None, *, fit_ids=None, options: dict[str, dict] | None = None,
            micro_batch_size: int = 8, cache_budget_mb: float = 2048.0, data_parallel: bool = False,
            progress: bool = False, skip=(),
            on_result: Callable[[str, Result], None] | None = None,
            on_error: Callable[[str, AnalysisError], None] | None = None) -> dict[str, Result]:
    """Run `metrics` on `input_ids` [N, T] and return {name: result}.

    metrics: None or "default" runs DEFAULT_METRICS (the same set `depthlab analyze` runs), "all" every metric;
    ``moe`` is dropped for dense models unless named explicitly. options: per-metric keyword arguments over
    DEFAULT_OPTIONS (permutation over adjacent pairs, the Jacobian estimate), e.g. ``{"usefulness": {"tau": 0.2}}``.
    fit_ids: the sample the affine maps of usefulness and branches are fitted on (None cross-fits `input_ids`, see `usefulness`).
    skip: names not to run (already done). The baseline is computed once and shared while it fits
    `cache_budget_mb`. `on_result(name, result)` is called as each metric finishes (the CLI saves it there, so an
    interrupted run keeps finished metrics). With `on_error`, a metric raising AnalysisError is reported there and
    the others still run; without, the error propagates. data_parallel: split the sequences over the ranks of the
    initialised torch.distributed process group (see `depthlab.analysis.engine`); every rank returns the results.
    """
    names = resolve_metrics(metrics)
    opts = resolve_options(options)
    engine = Engine(model, input_ids, micro_batch_size=micro_batch_size, cache_budget_mb=cache_budget_mb,
                    data_parallel=data_parallel)
    if "moe" in names and metrics in (None, "default", "all") and engine.stack.router(0) is None:
        names.remove("moe")
    check_data_parallel([n for n in names if n not in skip], engine.input_ids.shape[0], engine.world)
    if fit_ids is not None:  # every metric that fits affine maps fits them on the separate sample
        for name in FITTED_METRICS:
            opts.setdefault(name, {})["fit_ids"] = fit_ids
    results = {}
    for name in names:
        if name in skip:
            continue
        try:
            results[name] = METRICS[name](model, input_ids, engine=engine, progress=progress, **opts.get(name, {}))
        except AnalysisError as e:
            if on_error is None:
                raise
            on_error(name, e)
            continue
        if on_result is not None:
            on_result(name, results[name])
    engine.release()
    return results
