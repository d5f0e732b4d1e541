"""Evaluation: perplexity on held-out text, multiple-choice accuracy and generative exact match, zero- or few-shot,
with lm-evaluation-harness's prompts and results layout.

    results = depthlab.evaluate(model, tokenizer, tasks="arc_easy,piqa", limit=100)
    results["results"]["piqa"]["acc,none"]
    depthlab.evaluate(model, tokenizer, tasks="mmlu", num_fewshot=5)["results"]["mmlu"]["acc,none"]
    depthlab.perplexity(model, tokenizer, source="shakespeare")["bits_per_byte"]

Names are imported lazily, so the CLI can list the tasks (``depthlab.eval.tasks``) without loading torch.
"""

from __future__ import annotations

from depthlab.lazy import lazy_getattr

_EXPORTS = {
    "TASKS": "depthlab.eval.tasks",
    "load_examples": "depthlab.eval.tasks",
    "evaluate": "depthlab.eval.runner",
    "format_table": "depthlab.eval.runner",
    "save_results": "depthlab.eval.runner",
    "loglikelihoods": "depthlab.eval.scorer",
    "generate_until": "depthlab.eval.generation",
    "perplexity": "depthlab.eval.heldout",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
