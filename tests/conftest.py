"""Fixtures shared across the suite: a small prepared dataset, a tiny training config that trains in seconds, and a
tiny Hugging Face Llama folder."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from depthlab.config import load_config

WORDS = ["thou", "art", "the", "king", "of", "all", "land", "and", "yet", "night", "is", "long", "o", "my", "lord", "what", "say", "you", "to", "this", "fair", "morning", "when", "sun", "doth", "rise", "upon", "sea"]


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread inside the block, the previous setting restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: tests are tiny, and the 2-core CI machine runs other work beside them."""
    with one_torch_thread():
        yield


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


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE (300 tokens) with an eos token, trained on a few lines."""
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men players."]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, bpe_tokenizer):
    """A tiny Llama (3 blocks) and the byte-level BPE above, saved as a normal HF folder."""
    import transformers as T

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           initializer_range=0.25)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return folder
