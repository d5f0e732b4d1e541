"""Tiny models for the doctor/prune tests: a Hugging Face Llama folder with a tokenizer, and a trained depthlab run."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def tokenizer(bpe_tokenizer):
    """The suite's byte-level BPE with an eos token (tests/conftest.py)."""
    return bpe_tokenizer


def llama(vocab: int, layers: int = 4, seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           initializer_range=0.25)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def depthlab_run(tmp_path_factory, tiny_dataset):
    """A 4-block depthlab run trained for a few steps (weight decay 0.1 recorded in its config)."""
    from depthlab.train.trainer import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(tiny_dataset, "--model.n_layers=4", "--model.n_kv_heads=1", "--optimizer.weight_decay=0.1"),
          out)
    return out
