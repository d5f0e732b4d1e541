"""Tiny models and a tiny byte-level BPE for the evaluation tests (seconds on CPU, no downloads)."""

import itertools

import pytest
import torch

from depthlab.data.tokenizer import train_bpe
from depthlab.eval.tasks import TASKS, load_examples
from tests.conftest import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, and far faster when other processes share the cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    """A 600-token BPE trained on the bundled prompts, so task text tokenizes into realistic multi-byte pieces."""
    texts = [c + k for name in ("arc_easy", "piqa", "copa", "winogrande") for ex in load_examples(name, 100)
             for c, k in ex.requests]
    return train_bpe(texts, 600)


def tiny_llama(vocab_size: int, max_positions: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights at std 0.02 give nearly uniform predictions; sharpen them
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return model


@pytest.fixture(scope="session")
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def all_task_requests():
    """The first 2 examples of every multiple-choice task, flattened to requests: every prompt format in one list."""
    return list(itertools.chain.from_iterable(ex.requests for name, task in TASKS.items()
                                              if task.generation is None for ex in load_examples(name, 2)))
