"""The paper's reference numbers (SPEC §8), and which run setting each belongs to.

Muhtar et al., *When Does Sparsity Mitigate the Curse of Depth in LLMs* (arXiv 2603.15389). A table row is matched
to a run by the knob that defines it (depth L, weight decay λ, context T, GQA group size G) read from the run's
resolved config, or, for the MoE and recipe studies whose rows are named settings, by the run's setting name.
The paper's models are ~0.4–1B-parameter models trained on 5B FineWeb-Edu tokens: a tiny run with the same knob
value is not the same model, so reports label these columns "paper" and never mix them into the run's numbers.
"""

from __future__ import annotations

from typing import Any

# metric keys: ppl, usefulness, causal, permutation, avg_acc (points), last_var
REFERENCES: dict[str, dict[Any, dict[str, float]]] = {
    "depth": {
        12: {"causal": 0.355, "permutation": 0.985, "usefulness": 1.000, "last_var": 400},
        16: {"causal": 0.336, "permutation": 0.713, "usefulness": 0.813, "last_var": 600},
        24: {"causal": 0.289, "permutation": 0.438, "usefulness": 0.625, "last_var": 850},
        32: {"causal": 0.259, "permutation": 0.306, "usefulness": 0.562, "last_var": 1250},
    },
    "weight_decay": {
        0.0: {"ppl": 15.63, "usefulness": 0.75},
        0.01: {"ppl": 15.20, "usefulness": 0.75},
        0.1: {"ppl": 14.83, "usefulness": 0.81},
        1.0: {"ppl": 15.55, "usefulness": 0.69},
        3.0: {"ppl": 773.42, "usefulness": 0.63},
    },
    "context": {
        256: {"ppl": 18.51, "usefulness": 0.69},
        512: {"ppl": 15.71, "usefulness": 0.75},
        1024: {"ppl": 14.77, "usefulness": 0.75},
        2048: {"ppl": 14.51, "usefulness": 0.81},
        4096: {"ppl": 14.52, "usefulness": 0.81},
        8192: {"ppl": 16.30, "usefulness": 0.75},
    },
    "gqa": {
        1: {"ppl": 14.52, "usefulness": 0.81},
        4: {"ppl": 14.50, "usefulness": 0.87},
        16: {"ppl": 14.47, "usefulness": 0.87},
    },
    "moe": {
        "dense-400m": {"ppl": 17.56, "usefulness": 0.87},
        "moe-2b-400m": {"ppl": 15.89, "usefulness": 0.94},
        "dense-1b": {"ppl": 14.52, "usefulness": 0.81},
        "moe-7b-1b": {"ppl": 13.82, "usefulness": 0.94},
    },
    "recipe": {
        "baseline": {"avg_acc": 39.5},
        "+context": {"avg_acc": 40.0},
        "+wd": {"avg_acc": 41.4},
        "+gqa": {"avg_acc": 42.1},
        "+moe": {"avg_acc": 44.1},
        "half-depth": {"avg_acc": 40.1},
        "rejected-context-x2": {"avg_acc": 39.5},
        "rejected-wd-x2": {"avg_acc": 41.0},
        "rejected-wd-x3.3": {"avg_acc": 38.5},
    },
}
"""Reference study → row key → the paper's numbers. Depth's last-layer variances are approximate (read off a plot).
Recipe rows are the cumulative steps of the 32-layer ablation (+context = T 4096, +wd = λ 0.3, +gqa = G 2, +moe =
64 experts top-8), half-depth the 16-layer reference; rejected: T 8192, λ 0.6, λ 1.0."""

KNOB_LABELS = {"depth": "L", "weight_decay": "λ", "context": "T", "gqa": "G", "moe": "setting", "recipe": "setting"}


def row_key(reference: str, config: dict[str, Any], setting_name: str) -> Any:
    """The key of `reference`'s table that a run with this resolved config (nested dict) and setting name is."""
    model, optimizer = config["model"], config["optimizer"]
    if reference == "depth":
        return model["n_layers"]
    if reference == "weight_decay":
        return float(optimizer["weight_decay"])
    if reference == "context":
        return model["seq_len"]
    if reference == "gqa":
        return model["n_heads"] // (model["n_kv_heads"] or model["n_heads"])
    return setting_name.lower()


def paper_numbers(reference: str | None, config: dict[str, Any], setting_name: str) -> dict[str, float]:
    """The paper's numbers for this run's setting, or {} when the setting is not one of the paper's rows."""
    if reference is None:
        return {}
    return dict(REFERENCES[reference].get(row_key(reference, config, setting_name), {}))
