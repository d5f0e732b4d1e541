"""Tiny models for the doctor/prune tests: a Hugging Face Llama folder with a tokenizer, and a trained depthlab run."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE with an eos token, trained on a few lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men players."]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


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
