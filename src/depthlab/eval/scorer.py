"""Log-likelihood of continuations given contexts: the engine behind downstream accuracy.

Semantics follow lm-evaluation-harness's Hugging Face backend exactly, so the decisions match:
- trailing spaces of a context move to the front of its continuation; the pair is tokenized as ``context +
  continuation`` and the continuation's tokens are whatever follows the context's own tokenization;
- strings are tokenized with the tokenizer's default special tokens (a BOS where the tokenizer adds one);
- a sequence longer than the model's context keeps its last ``context_length + 1`` tokens.

What makes it fast, without changing any number:
- **Shared prefixes run once.** A causal model's logits at position ``p`` depend only on tokens ``0..p``, so a request
  whose input (``context + continuation[:-1]``) is a prefix of another request's input is read off that longer row.
  Choices of a single token after a shared context (MMLU's letters, BoolQ's yes/no) cost one row per example, not
  one per choice, and duplicated requests cost nothing.
- **Rows sorted by length, right-padded.** Padding after the real tokens cannot affect them under a causal mask, so
  no attention mask is needed (which is also why any model with ``model(input_ids).logits`` works, depthlab's own
  included) and little compute is wasted on padding.
- **Only the needed logits.** Hugging Face models that accept ``logits_to_keep`` compute the LM head only over the
  window that holds continuation positions; log-softmax runs in fp32 only on the continuation positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.errors import EvalError


@dataclass(frozen=True)
class Score:
    """Summed log-probability (nats) of a continuation, its token count, and whether greedy decoding yields it."""

    logprob: float
    n_tokens: int
    greedy: bool


def context_length(model) -> int:
    """The longest sequence the model accepts, from its config (Hugging Face or depthlab names)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "seq_len", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EvalError(f"cannot tell the context length of {type(model).__name__}: its config has none of "
                    "max_position_embeddings, n_positions, seq_len; pass context_length=")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def forward_logits(model, input_ids: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
    """``model(input_ids).logits``; with ``keep_last`` only the last positions' logits are needed (and, for models
    that support ``logits_to_keep``, the only ones computed). Returns at least those positions."""
    params = inspect.signature(model.forward).parameters
    kwargs = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if keep_last is not None and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep_last
    logits = model(input_ids, **kwargs).logits
    return logits if keep_last is None else logits[:, -keep_last:]


def encode_pairs(tokenizer, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Tokenize (context, continuation) pairs the way lm-eval does: ``whole[len(encode(context)):]`` is the
    continuation. Unique strings are encoded once, in one batched tokenizer call."""
    shifted = []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            raise EvalError("a request has an empty context; every task prompt must give the model some text")
        shifted.append((context, context + continuation))
    strings = list(dict.fromkeys(s for pair in shifted for s in pair))
    ids = dict(zip(strings, tokenizer(strings)["input_ids"]))
    pairs = []
    for context, whole in shifted:
        context_ids, whole_ids = ids[context], ids[whole]
        continuation_ids = whole_ids[len(context_ids):]
        if not continuation_ids:
            raise EvalError(f"continuation of {context[-40:]!r} tokenizes to nothing; cannot score it")
        pairs.append((context_ids, continuation_ids))
    return pairs


def _plan_rows(inputs: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Assign each input to a row whose tokens start with it; returns (rows, row index of each input).

    In lexicographic order, the inputs that extend a sequence form a block right after it, so walking the sorted
    inputs backwards and reusing the row of the next input whenever it starts with the current one finds every
    prefix relation in one pass.
    """
    order = sorted(range(len(inputs)), key=inputs.__getitem__)
    rows: list[tuple[int, ...]] = []
    row_of = [0] * len(inputs)
    for i in reversed(order):
        seq = inputs[i]
        if not rows or rows[-1][:len(seq)] != seq:
            rows.append(seq)
        row_of[i] = len(rows) - 1
    return rows, row_of


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 32,
                   max_length: int | None = None, progress: bool = False) -> list[Score]:
    """Score each (context, continuation) request with ``model``; one ``Score`` per request, in input order.

    ``batch_size`` is the number of rows per forward pass; results do not depend on it (up to floating-point
    reassociation in the model's kernels).
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_length or context_length(model)
    inputs, targets = [], []
    for context_ids, continuation_ids in encode_pairs(tokenizer, requests):
        if len(continuation_ids) > max_len:
            raise EvalError(f"a continuation of {len(continuation_ids)} tokens exceeds the model's context "
                            f"of {max_len}")
        seq = (context_ids + continuation_ids)[-(max_len + 1):]
        inputs.append(tuple(seq[:-1]))
        targets.append(continuation_ids)
    rows, row_of = _plan_rows(inputs)
    members: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(row_of):
        members[r].append(i)

    device = model_device(model)
    logprob = torch.zeros(len(requests), dtype=torch.float64)
    greedy = torch.ones(len(requests), dtype=torch.bool)
    by_length = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    bar = tqdm(total=len(requests), desc="scoring", unit="req", disable=not progress, leave=False)
    for start in range(0, len(by_length), batch_size):
        batch = by_length[start:start + batch_size]
        width = len(rows[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        row_idx, pos_idx, tgt, owner = [], [], [], []
        for b, r in enumerate(batch):
            ids[b, :len(rows[r])] = torch.tensor(rows[r])
            for i in members[r]:
                n, c = len(inputs[i]), len(targets[i])
                row_idx += [b] * c
                pos_idx += range(n - c, n)
                tgt += targets[i]
                owner += [i] * c
        first = min(pos_idx)
        logits = forward_logits(model, ids.to(device), keep_last=width - first)
        picked = logits[torch.tensor(row_idx), torch.tensor(pos_idx) - first].float().log_softmax(-1).cpu()
        tgt_t, owner_t = torch.tensor(tgt), torch.tensor(owner)
        token_lp = picked.gather(1, tgt_t[:, None]).squeeze(1).double()
        logprob.index_add_(0, owner_t, token_lp)
        miss = (picked.argmax(-1) != tgt_t).long()
        greedy &= torch.zeros(len(requests), dtype=torch.long).index_add_(0, owner_t, miss) == 0
        bar.update(sum(len(members[r]) for r in batch))
    bar.close()
    return [Score(float(lp), len(t), bool(g)) for lp, t, g in zip(logprob.tolist(), targets, greedy.tolist())]
