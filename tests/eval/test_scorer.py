"""The batched scorer against a brute-force reference: one plain forward pass per (context, continuation)."""

import random

import pytest
import torch

from depthlab.config import ModelConfig
from depthlab.eval.scorer import _plan_rows, _prefix_tree, loglikelihoods
from depthlab.eval.tasks import TASKS, load_examples
from depthlab.model.transformer import Transformer


def brute_force(model, tokenizer, context: str, continuation: str, max_length: int):
    """lm-eval's recipe written out plainly: move the context's trailing spaces to the continuation, tokenize the
    whole string and the context separately, keep the last max_length+1 tokens, one unbatched forward pass."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    cont = whole[len(tokenizer.encode(stripped)):]
    seq = whole[-(max_length + 1):]
    logits = model(torch.tensor([seq[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)[-len(cont):]
    picked = logprobs[torch.arange(len(cont)), torch.tensor(cont)]
    return picked.sum().item(), len(cont), bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


@pytest.fixture(scope="module")
def requests(all_task_requests):
    # Every prompt format, plus: a duplicate, a context ending in spaces, and an overlong context (truncated).
    return all_task_requests + [all_task_requests[0], ("Question: why?  ", "because"),
                                ("lorem ipsum dolor " * 60, " sit amet")]


@torch.no_grad()
def test_matches_brute_force_per_request(llama, tokenizer, requests):
    scores = loglikelihoods(llama, tokenizer, requests, batch_size=7)
    for (context, continuation), score in zip(requests, scores):
        logprob, n_tokens, greedy = brute_force(llama, tokenizer, context, continuation, 256)
        assert score.logprob == pytest.approx(logprob, abs=1e-4, rel=1e-5)
        assert (score.n_tokens, score.greedy) == (n_tokens, greedy)


def test_batch_size_and_order_do_not_change_scores(llama, tokenizer, requests):
    reference = [s.logprob for s in loglikelihoods(llama, tokenizer, requests, batch_size=1)]
    for batch_size in (3, 64):
        got = [s.logprob for s in loglikelihoods(llama, tokenizer, requests, batch_size=batch_size)]
        assert got == pytest.approx(reference, abs=1e-4)
    order = list(range(len(requests)))
    random.Random(0).shuffle(order)
    shuffled = loglikelihoods(llama, tokenizer, [requests[i] for i in order], batch_size=5)
    assert [s.logprob for s in shuffled] == pytest.approx([reference[i] for i in order], abs=1e-4)


@pytest.mark.parametrize("pack", [True, False])
def test_packed_and_unpacked_rows_agree(llama, tokenizer, requests, pack):
    """One row per example (choices as masked segments) or one row per choice: the same numbers."""
    reference = loglikelihoods(llama, tokenizer, requests, batch_size=4, pack=not pack)
    got = loglikelihoods(llama, tokenizer, requests, batch_size=9, pack=pack)
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in reference], abs=1e-4)
    assert [s.greedy for s in got] == [s.greedy for s in reference]


def test_packing_works_for_absolute_positions(tokenizer, all_task_requests):
    """GPT-2 (learned absolute positions, its own attention code) scores packed rows like the brute force."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=256)).eval()
    requests = [r for r in all_task_requests if len(r[0]) < 300]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=5, pack=True)
    for (context, continuation), score in zip(requests, scores):
        assert score.logprob == pytest.approx(brute_force(model, tokenizer, context, continuation, 256)[0],
                                              abs=1e-4, rel=1e-5)


def test_truncation_keeps_the_last_tokens(llama, tokenizer):
    context, continuation = "lorem ipsum dolor " * 60, " sit amet"
    (score,) = loglikelihoods(llama, tokenizer, [(context, continuation)], max_length=32)
    assert score.logprob == pytest.approx(brute_force(llama, tokenizer, context, continuation, 32)[0], abs=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("pack", [True, False])
def test_continuation_longer_than_the_context_is_scored_in_windows(llama, tokenizer, pack):
    """Each token of an overlong continuation is scored once, in windows of max_length tokens ending at a piece of
    at most max_length // 2 targets (so it sees >= half a context): written out token by token here."""
    context, continuation, max_length = "Question: what then?", " and then" * 30, 16
    stripped = context.rstrip()
    whole = tokenizer.encode(stripped + continuation)
    first = len(tokenizer.encode(stripped))
    assert len(whole) - first > 2 * max_length  # the case under test: several pieces
    expected = 0.0
    for start in range(first, len(whole), max_length // 2):
        end = min(start + max_length // 2, len(whole))
        window = whole[max(0, end - max_length - 1):end - 1]
        logprobs = torch.log_softmax(llama(torch.tensor([window])).logits[0].double(), -1)[-(end - start):]
        expected += logprobs[torch.arange(end - start), torch.tensor(whole[start:end])].sum().item()
    short = ("Question: why?", " because")
    scores = loglikelihoods(llama, tokenizer, [(context, continuation), short], max_length=max_length, pack=pack)
    assert scores[0].logprob == pytest.approx(expected, abs=1e-4) and scores[0].n_tokens == len(whole) - first
    assert scores[1].logprob == pytest.approx(brute_force(llama, tokenizer, *short, max_length)[0], abs=1e-4)


def test_greedy_flag(llama, tokenizer):
    """A continuation made of the model's own argmax tokens is greedy; changing its last token makes it not."""
    ids = tokenizer.encode("Question: what is it?\nAnswer:")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(llama(torch.tensor([ids])).logits[0, -1].argmax()))
    context = tokenizer.decode(ids[:-3])
    greedy = tokenizer.decode(ids)[len(context):]
    scores = loglikelihoods(llama, tokenizer, [(context, greedy)])
    if tokenizer.encode(context + greedy)[len(tokenizer.encode(context)):] == ids[-3:]:  # tokenization round-trips
        assert scores[0].greedy


def test_examples_as_prefix_trees(llama, tokenizer):
    """All requests of an example in one tree row (Winogrande: two contexts sharing a prefix) score like the brute
    force."""
    examples = [ex for name, task in TASKS.items() if task.generation is None for ex in load_examples(name, 2)]
    requests = [r for ex in examples for r in ex.requests]
    groups = [i for i, ex in enumerate(examples) for _ in ex.requests]
    scores = loglikelihoods(llama, tokenizer, requests, groups=groups, batch_size=3, max_tokens=600)
    for (context, continuation), score in zip(requests, scores):
        assert score.logprob == pytest.approx(brute_force(llama, tokenizer, context, continuation, 256)[0],
                                              abs=1e-4, rel=1e-5)


def test_prefix_tree_layout():
    """Depth-first order: each input is a root-to-node path, position ids are depths, and ``k <= q <= end[k]`` is
    exactly the ancestor relation."""
    rng = random.Random(2)
    inputs = [tuple(rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 6))) for _ in range(30)]
    row = _prefix_tree(inputs, list(range(30)), [1] * 30)
    for i, seq in enumerate(inputs):
        node = next(nodes[-1] for j, nodes in row.reads if j == i)
        path = [q for q in range(node + 1) if q <= node <= row.end[q]]  # ancestors by the interval rule
        assert [row.tokens[q] for q in path] == list(seq) and [row.depth[q] for q in path] == list(range(len(seq)))
    assert len(row.tokens) == len({seq[:n] for seq in inputs for n in range(1, len(seq) + 1)})  # each prefix once


def test_plan_rows_finds_every_prefix():
    """Each input is served by a row that starts with it, and only inputs that are no other input's prefix (and
    are distinct) become rows."""
    rng = random.Random(1)
    inputs = [tuple(rng.choice([1, 2]) for _ in range(rng.randint(1, 5))) for _ in range(200)]
    rows, row_of = _plan_rows(inputs)
    for seq, r in zip(inputs, row_of):
        assert rows[r][:len(seq)] == seq
    maximal = {s for s in inputs if not any(o != s and o[:len(s)] == s for o in inputs)}
    assert sorted(rows) == sorted(maximal)


def test_single_token_choices_share_one_row():
    inputs = [(5, 6, 7), (5, 6, 7), (5, 6, 7, 8), (9,)]
    rows, row_of = _plan_rows(inputs)
    assert len(rows) == 2 and row_of[0] == row_of[1] == row_of[2] != row_of[3]


def test_depthlab_transformer(tokenizer, all_task_requests):
    """depthlab's own model (``model(input_ids).logits``, no attention mask, context from ``config.seq_len``)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4,
                                    seq_len=128)).eval()
    requests = all_task_requests[:30]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=8)
    for (context, continuation), score in zip(requests, scores):
        assert score.logprob == pytest.approx(brute_force(model, tokenizer, context, continuation, 128)[0],
                                              abs=1e-4, rel=1e-5)
