"""Perplexity against per-token brute force, with and without sliding windows."""

import math

import pytest
import torch

from depthlab.errors import EvalError
from depthlab.eval import perplexity
from depthlab.eval.heldout import _windows

TEXT = "Question: which of these is a mammal?\nAnswer: the whale, which breathes air. " * 3


def token_nlls(model, stream, window):
    """NLL of each token of ``stream[1:]`` given at most ``window`` preceding tokens, one forward pass each."""
    out = []
    with torch.no_grad():
        for j in range(1, len(stream)):
            context = stream[max(0, j - window):j]
            logprobs = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].double(), -1)
            out.append(-logprobs[stream[j]].item())
    return out


def stream_of(tokenizer, text):
    return [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_stride_one_gives_every_token_a_full_window(llama, tokenizer):
    """With stride 1 every token sees exactly min(its position, window) tokens of context."""
    stream = stream_of(tokenizer, TEXT)
    expected = token_nlls(llama, stream, 8)
    got = perplexity(llama, tokenizer, TEXT, context_length=8, stride=1)
    assert got["tokens"] == len(stream) - 1
    assert got["nll"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))
    assert got["bits_per_byte"] == pytest.approx(sum(expected) / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_one_window_when_the_text_fits(llama, tokenizer):
    stream = stream_of(tokenizer, TEXT)
    expected = token_nlls(llama, stream, len(stream))
    got = perplexity(llama, tokenizer, TEXT, context_length=len(stream))
    assert got["nll"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("n,length,stride", [(2, 4, 4), (30, 8, 8), (30, 8, 3), (31, 8, 1), (9, 8, 8)])
def test_windows_score_each_token_once_with_enough_context(n, length, stride):
    scored = []
    for begin, end, first in _windows(n, length, stride):
        assert end - begin <= length
        scored += range(first + 1, end + 1)
        assert all(t - begin >= min(t, length - stride) for t in range(first + 1, end + 1))
    assert scored == list(range(1, n))


def test_documents_are_scored_separately(llama, tokenizer):
    """Two documents cost the sum of their NLLs (each starts after its own prefix token) and their bytes add."""
    a, b = "The whale breathes air.", "Answer: the cat."
    both = perplexity(llama, tokenizer, [a, b], context_length=64)
    one, two = (perplexity(llama, tokenizer, t, context_length=64) for t in (a, b))
    assert both["tokens"] == one["tokens"] + two["tokens"] and both["documents"] == 2
    total = one["nll"] * one["tokens"] + two["nll"] * two["tokens"]
    assert both["nll"] * both["tokens"] == pytest.approx(total, rel=1e-6)
    assert both["bytes"] == len(a) + len(b)
    one_by_one = perplexity(llama, tokenizer, [a, b, TEXT], context_length=16, max_tokens=1)  # one window a pass
    batched = perplexity(llama, tokenizer, [a, b, TEXT], context_length=16, max_tokens=4096)
    assert one_by_one["nll"] == pytest.approx(batched["nll"], rel=1e-6)


def test_sources_and_errors(llama, tokenizer, tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT)
    from_file = perplexity(llama, tokenizer, source=path, context_length=16)
    assert from_file["nll"] == pytest.approx(perplexity(llama, tokenizer, TEXT, context_length=16)["nll"])
    with pytest.raises(EvalError, match="not found"):
        perplexity(llama, tokenizer, source=tmp_path / "missing.txt")
    with pytest.raises(EvalError, match="exactly one"):
        perplexity(llama, tokenizer)
    with pytest.raises(EvalError, match="context_length must be in"):
        perplexity(llama, tokenizer, TEXT, context_length=10_000)
    with pytest.raises(EvalError, match="stride"):
        perplexity(llama, tokenizer, TEXT, context_length=8, stride=9)
