"""Deterministic, stateless randomness for data: which documents are held out, which windows a batch reads.

Every random choice is a hash of the integers that identify it (seed, step, sequence index, ...), never the state
of a generator. So a resumed run at step k draws exactly what an uninterrupted run drew at step k, any number of
ranks split one global batch without communicating, and results do not depend on the numpy version.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from depthlab.errors import DataError

_MASK = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser: a bijection on uint64 whose outputs look independent for consecutive inputs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash64(*keys: int | np.ndarray) -> np.ndarray:
    """A 64-bit hash of a tuple of integer keys; array keys broadcast, so one call hashes a whole batch."""
    z = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        for key in keys:
            if isinstance(key, (int, np.integer)):
                key = np.uint64(int(key) & _MASK)
            else:
                key = np.asarray(key).astype(np.uint64)
            z = _splitmix64(z + np.uint64(0x9E3779B97F4A7C15) + key)  # SplitMix64's golden-ratio step
    return np.asarray(z)


def seeded_order(n: int, *keys: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``keys``; its first m entries are a seeded m-subset, and a smaller
    subset is always a prefix of a larger one."""
    return np.argsort(hash64(*keys, np.arange(n, dtype=np.uint64)), kind="stable")


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, rank: int = 0,
                 world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, LongTensors [batch_size, seq_len], read at random offsets of ``tokens``.

    ``batch_size`` is per rank. Sequence ``i`` of ``rank`` is global sequence ``rank·batch_size + i`` of step
    ``step``, and its offset is a hash of (seed, step, global index) alone: the global batch of a step is the same
    whether 1 rank draws B sequences or 2 ranks draw B/2 each, and resuming at step k just continues.
    """
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"token split has {n} tokens, too few for one sequence of seq_len {seq_len} (+1 target)")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    first = rank * batch_size
    index = np.arange(first, first + batch_size, dtype=np.uint64)
    offsets = (hash64(seed, step, index) % np.uint64(n - seq_len)).astype(np.int64)
    windows = np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    chunk = torch.from_numpy(windows)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: consecutive non-overlapping windows from the start of ``tokens``, in order.

    The evaluated windows are the first ``max_batches·batch_size`` (all when None); rank r takes windows
    r, r+world, ..., so the ranks together cover exactly what one process covers. Ranks may get one batch fewer than
    others: accumulate loss sums locally and all-reduce once after the loop. The last batch may be smaller.
    """
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"token split has {len(tokens)} tokens, too few for one window of seq_len {seq_len} (+1)")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    mine = np.arange(rank, n_windows, world_size)
    for start in range(0, len(mine), batch_size):
        offsets = mine[start:start + batch_size] * seq_len
        chunk = torch.from_numpy(np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
