"""Fixtures shared across the suite: a small prepared dataset and a tiny training config that trains in seconds."""

from __future__ import annotations

import random

import pytest
import torch

from depthlab.config import load_config

WORDS = ["thou", "art", "the", "king", "of", "all", "land", "and", "yet", "night", "is", "long", "o", "my", "lord", "what", "say", "you", "to", "this", "fair", "morning", "when", "sun", "doth", "rise", "upon", "sea"]


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: tests are tiny, and the 2-core CI machine runs other work beside them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset of 24 short synthetic documents with a 300-token BPE."""
    from depthlab.data import prepare_data

    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(24):
        lines = [" ".join(rng.choices(WORDS, k=9)) for _ in range(40)]
        (corpus / f"doc{i:02d}.txt").write_text(f"Scene {i}.\n" + "\n".join(lines) + "\n")
    return prepare_data(corpus, root / "prepared", vocab_size=300, val_fraction=0.2)


def tiny_config(dataset, *overrides: str):
    """A 2-block d=32 model on `dataset`: a dozen steps take about a second."""
    return load_config(None, [
        f"--data.path={dataset}", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2",
        "--model.seq_len=32", "--trainer.batch_size=8", "--trainer.max_steps=12", "--trainer.save_interval=4",
        "--trainer.eval_interval=6", "--trainer.eval_batches=2", "--trainer.stats_interval=3",
        "--trainer.log_interval=1", "--schedule.warmup_steps=3", "--logging.progress=false",
        "--logging.tensorboard=false", "--trainer.dtype=fp32", *overrides])
