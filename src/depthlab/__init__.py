"""depthlab: measure and fix the curse of depth in large language models.

The public API. Every name is imported lazily, so ``import depthlab`` stays fast and optional dependencies are only
needed by the features that use them.

    model, tokenizer = depthlab.load_model("smollm2")
    results = depthlab.analyze(model, input_ids, metrics=["variance", "usefulness"])
"""

from __future__ import annotations

from depthlab.lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    # configuration and errors
    "Config": "depthlab.config",
    "load_config": "depthlab.config",
    "DepthlabError": "depthlab.errors",
    # data
    "prepare_data": "depthlab.data",
    "TokenDataset": "depthlab.data",
    "calibration_sample": "depthlab.data",
    "default_dataset": "depthlab.data",
    # models
    "load_model": "depthlab.loading",
    "Transformer": "depthlab.model.transformer",
    "export_hf": "depthlab.model.hf",
    # training
    "train": "depthlab.train.trainer",
    # analysis, evaluation
    "analyze": "depthlab.analysis",
    "evaluate": "depthlab.eval",
    "perplexity": "depthlab.eval",
    # studies, theory, tools
    "run_study": "depthlab.study",
    "simulate": "depthlab.theory",
    "make_recipe": "depthlab.tools.recipe",
    "diagnose": "depthlab.tools.doctor",
    "prune": "depthlab.tools.prune",
}

__all__ = ["__version__"]
__all__ += list(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
