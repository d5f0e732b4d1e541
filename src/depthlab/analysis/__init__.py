"""Layer-effectiveness and sparsity metrics (SPEC §5), all on one shared engine.

    from depthlab.analysis import analyze, usefulness
    results = analyze(model, input_ids, metrics=["variance", "usefulness"])

Each metric is a public function ``metric(model, input_ids, **options) -> Result`` with ``.to_dict()``.
Names are imported lazily so that importing one metric does not import them all.
"""

from __future__ import annotations

from depthlab.lazy import lazy_getattr

_EXPORTS = {
    "Engine": "depthlab.analysis.engine",
    "ModelView": "depthlab.model.view",
    "Drop": "depthlab.analysis.engine",
    "variance_profile": "depthlab.analysis.profiles",
    "angular_distance": "depthlab.analysis.profiles",
    "usefulness": "depthlab.analysis.replacement",
    "causal_effects": "depthlab.analysis.interventions",
    "permutation_scores": "depthlab.analysis.interventions",
    "jacobian": "depthlab.analysis.jacobians",
    "weight_sparsity": "depthlab.analysis.sparsity",
    "attention_sparsity": "depthlab.analysis.sparsity",
    "moe_stats": "depthlab.analysis.moe",
    "logit_lens": "depthlab.analysis.lens",
    "tuned_lens": "depthlab.analysis.lens",
    "branch_effects": "depthlab.analysis.branches",
    "analyze": "depthlab.analysis.suite",
    "METRICS": "depthlab.analysis.suite",
    "run_analysis": "depthlab.analysis.runner",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
