"""Count-based baselines: how far past "statistics of single tokens and token pairs" a trained model got.

Both are fitted on the run's training split and scored on exactly the (context, target) pairs of the trainer's
validation loss (the first ``eval_batches · batch_size`` windows of ``seq_len`` tokens of the validation split, each
target predicted from the tokens before it in its window), in nats per token, so they sit on the same scale as
``val_loss``:

    unigram:        p(b)     = (c(b) + 1) / (N + V)
    add-one bigram: p(b | a) = (c(a, b) + 1) / (c(a) + V)

with c the training-split counts, N the number of training tokens and V the vocabulary size. Pair counts are kept
sparse (one int64 code ``a·V + b`` per distinct pair), so a 50k vocabulary costs memory for the pairs seen only.
A model whose validation loss is not below the bigram cross-entropy has learnt nothing beyond token pairs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def validation_pairs(val_tokens: np.ndarray, seq_len: int, n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, target) of every target in the trainer's validation windows (see `evaluate_loss`)."""
    n_windows = min(n_windows, (len(val_tokens) - 1) // seq_len)
    span = np.asarray(val_tokens[:n_windows * seq_len + 1], dtype=np.int64)
    return span[:-1], span[1:]


def cross_entropies(train_tokens: np.ndarray, prev: np.ndarray, target: np.ndarray,
                    vocab_size: int) -> dict[str, float]:
    """{"unigram": CE, "bigram": CE} in nats per token of `target` (bigram conditioned on `prev`)."""
    train = np.asarray(train_tokens, dtype=np.int64)
    unigram = np.bincount(train, minlength=vocab_size).astype(np.float64)
    unigram_ce = -np.mean(np.log((unigram[target] + 1) / (len(train) + vocab_size)))
    context = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
    codes, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    wanted = prev * vocab_size + target
    at = np.clip(np.searchsorted(codes, wanted), 0, len(codes) - 1)
    pair = np.where(codes[at] == wanted, counts[at], 0).astype(np.float64)
    bigram_ce = -np.mean(np.log((pair + 1) / (context[prev] + vocab_size)))
    return {"unigram": float(unigram_ce), "bigram": float(bigram_ce)}


def run_baselines(config: dict[str, Any]) -> dict[str, Any]:
    """The baselines of a run (its resolved config as a nested dict), on its dataset and validation windows."""
    from depthlab.data import TokenDataset, default_dataset

    data, trainer = config["data"], config["trainer"]
    dataset = TokenDataset(data["path"] or default_dataset(data["vocab_size"]))
    seq_len = config["model"]["seq_len"]
    prev, target = validation_pairs(dataset.split("val"), seq_len, trainer["eval_batches"] * trainer["batch_size"])
    ce = cross_entropies(dataset.split("train"), prev, target, dataset.vocab_size)
    return {**ce, "unigram_ppl": math.exp(ce["unigram"]), "bigram_ppl": math.exp(ce["bigram"]),
            "tokens": len(target), "vocab_size": dataset.vocab_size}
