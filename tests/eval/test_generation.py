"""Batched greedy generation against a brute-force reference: one prompt at a time, one full forward pass per token."""

import pytest
import torch

from depthlab.config import ModelConfig
from depthlab.errors import EvalError
from depthlab.eval.generation import generate_until
from depthlab.model.transformer import Transformer

PROMPTS = ["Question: which of these is a mammal?\nAnswer:", "Calculate 5 + 91 =", "The man turned on the faucet",
           "Q: when was the last time anyone was on the moon?\nA:", "Sarah was a much better surgeon than Maria so"]


def brute_force(model, tokenizer, prompt, until, max_new, max_len):
    """Greedy tokens until the decoded new text holds a stop string or EOS; the text cut before the first stop."""
    ids = tokenizer(prompt)["input_ids"][-(max_len - max_new):]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] == tokenizer.eos_token_id or any(s in tokenizer.decode(new) for s in until):
                break
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def depthlab_model(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, seq_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return model


@pytest.mark.parametrize("which", ["llama", "depthlab_model"])
@pytest.mark.parametrize("until,max_new", [(("e", "a"), 12), ((), 6)])
def test_matches_brute_force_for_any_batching(request, tokenizer, which, until, max_new):
    model = request.getfixturevalue(which)
    max_len = 64 if which == "depthlab_model" else 256
    expected = [brute_force(model, tokenizer, p, until, max_new, max_len) for p in PROMPTS]
    assert any(expected) and all(not any(s in e for s in until) for e in expected)
    for batch_size, max_tokens in [(1, 4096), (5, 4096), (2, 40)]:
        got = generate_until(model, tokenizer, PROMPTS, until=until, max_gen_toks=max_new, batch_size=batch_size,
                             max_tokens=max_tokens)
        assert got == expected, (which, batch_size, max_tokens)


def test_long_prompts_keep_their_end(depthlab_model, tokenizer):
    long = " ".join(PROMPTS * 4)
    got = generate_until(depthlab_model, tokenizer, [long], until=(), max_gen_toks=8)
    assert got == [brute_force(depthlab_model, tokenizer, long, (), 8, 64)]


def test_bad_settings(llama, tokenizer):
    with pytest.raises(EvalError, match="must be below the model's context"):
        generate_until(llama, tokenizer, PROMPTS, until=("\n",), max_gen_toks=256)
    with pytest.raises(EvalError, match=">= 1"):
        generate_until(llama, tokenizer, PROMPTS, until=("\n",), max_gen_toks=4, batch_size=0)


def test_short_context_models_generate_in_half_their_context(depthlab_model, tokenizer):
    """nq_open's 256-token budget does not fit a 64-token model: it generates at most 32 tokens after the last 32
    of the prompt, as a direct call with that budget does."""
    from depthlab.eval import evaluate
    from depthlab.eval.tasks import load_examples

    out = evaluate(depthlab_model, tokenizer, "nq_open", limit=2, num_fewshot=1, log_samples=True)
    prompts = [q.context for q in load_examples("nq_open", 2, num_fewshot=1)]
    expected = generate_until(depthlab_model, tokenizer, prompts, until=("\n", ".", ","), max_gen_toks=32)
    assert [s["generation"] for s in out["samples"]["nq_open"]] == expected
