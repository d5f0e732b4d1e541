"""Evaluation: perplexity on held-out text and zero-shot multiple-choice accuracy (lm-eval-compatible prompts).

    results = depthlab.evaluate(model, tokenizer, tasks="arc_easy,piqa", limit=100)
    results["results"]["piqa"]["acc,none"]
    depthlab.perplexity(model, tokenizer, source="shakespeare")["bits_per_byte"]
"""

from depthlab.eval.perplexity import perplexity
from depthlab.eval.runner import evaluate, format_table, save_results
from depthlab.eval.scorer import loglikelihoods
from depthlab.eval.tasks import TASKS, load_examples

__all__ = ["TASKS", "evaluate", "format_table", "load_examples", "loglikelihoods", "perplexity", "save_results"]
