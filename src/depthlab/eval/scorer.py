"""Log-likelihood of continuations given contexts: the engine behind downstream accuracy.

Semantics follow lm-evaluation-harness's Hugging Face backend exactly, so the decisions match:
- trailing spaces of a context move to the front of its continuation; the pair is tokenized as ``context +
  continuation`` and the continuation's tokens are whatever follows the context's own tokenization;
- strings are tokenized with the tokenizer's default special tokens (a BOS where the tokenizer adds one);
- a sequence longer than the model's context keeps its last ``context_length + 1`` tokens.

What makes it fast, without changing any number:
- **The shared context runs once per example.** All choices of an example go into one row: the context, then each
  choice's tokens as its own segment. A 4D attention mask lets a segment see the context and its own earlier tokens
  only, and position ids restart after the context for every segment, so each choice is computed exactly as if it
  were alone after the context (the first token of every choice is read off the context's last position). Models
  whose ``forward`` takes no ``attention_mask``/``position_ids`` (depthlab's own) get one row per choice instead.
- **Shared prefixes are computed once.** A causal model's logits at position ``p`` depend only on tokens ``0..p``, so
  a choice whose input tokens are a prefix of another's (MMLU's single letters, BoolQ's yes/no: empty segments)
  costs nothing extra, and duplicated requests cost nothing.
- **Rows sorted by length, right-padded.** Padding after the real tokens cannot affect them under a causal mask, so
  rows without packed segments need no mask at all, and little compute is wasted on padding.
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


def forward_logits(model, input_ids: torch.Tensor, keep_last: int | None = None, **kwargs) -> torch.Tensor:
    """``model(input_ids, **kwargs).logits``; with ``keep_last`` only the last positions' logits are needed (and, for
    models that support ``logits_to_keep``, the only ones computed). Returns at least those positions."""
    params = inspect.signature(model.forward).parameters
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


def _accepts(model, *names: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return all(n in params for n in names)


@dataclass
class _Row:
    """One batch row: a context followed by segments (continuations minus their last token), each segment seeing
    the context and itself. ``members`` are (request, segment index) pairs read off this row."""

    context: tuple[int, ...]
    segments: list[tuple[int, ...]]
    members: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.context) + sum(map(len, self.segments))


def _plan(contexts: list[tuple[int, ...]], segments: list[tuple[int, ...]], pack: bool) -> list[_Row]:
    """Group requests by context; within a group, a segment that is a prefix of another shares its tokens. Packed:
    one row per context; otherwise one row per distinct segment."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        groups.setdefault(context, []).append(i)
    rows = []
    for context, members in groups.items():
        unique, seg_of = _plan_rows([segments[i] for i in members])
        if pack:
            rows.append(_Row(context, unique, [(i, s) for i, s in zip(members, seg_of)]))
        else:
            rows += [_Row(context, [seg], [(i, 0) for i, s in zip(members, seg_of) if s == k])
                     for k, seg in enumerate(unique)]
    return rows


def _packed_inputs(rows: list[_Row], width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4D attention mask [B, 1, T, T] and position ids [B, T] of packed rows (padding attends to
    itself, so no softmax row is empty)."""
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        c = len(row.context)
        seg[b, :c], pos[b, :c] = 0, torch.arange(c)
        at = c
        for k, segment in enumerate(row.segments, 1):
            seg[b, at:at + len(segment)], pos[b, at:at + len(segment)] = k, torch.arange(c, c + len(segment))
            at += len(segment)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], pos


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 32,
                   max_length: int | None = None, pack: bool | None = None, progress: bool = False) -> list[Score]:
    """Score each (context, continuation) request with ``model``; one ``Score`` per request, in input order.

    batch_size: rows per forward pass (a row holds one example's context and all its choices when packing).
    pack: put all choices of a context in one row (default: when ``model.forward`` takes ``attention_mask`` and
    ``position_ids``). Results depend on neither, up to floating-point reassociation in the model's kernels.
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_length or context_length(model)
    pack = _accepts(model, "attention_mask", "position_ids") if pack is None else pack
    contexts, segments, targets = [], [], []
    for context_ids, continuation_ids in encode_pairs(tokenizer, requests):
        if len(continuation_ids) > max_len:
            raise EvalError(f"a continuation of {len(continuation_ids)} tokens exceeds the model's context "
                            f"of {max_len}")
        context = (context_ids + continuation_ids)[-(max_len + 1):][:-len(continuation_ids)]
        contexts.append(tuple(context))
        segments.append(tuple(continuation_ids[:-1]))
        targets.append(continuation_ids)
    rows = sorted(_plan(contexts, segments, pack), key=len, reverse=True)

    device = model_device(model)
    dtype = next(model.parameters()).dtype
    logprob = torch.zeros(len(requests), dtype=torch.float64)
    greedy = torch.ones(len(requests), dtype=torch.bool)
    bar = tqdm(total=len(requests), desc="scoring", unit="req", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        row_idx, pos_idx, tgt, owner = [], [], [], []
        for b, row in enumerate(batch):
            ids[b, :len(row)] = torch.tensor(row.context + sum(row.segments, ()))
            offsets = [len(row.context)]
            for segment in row.segments:
                offsets.append(offsets[-1] + len(segment))
            for i, k in row.members:
                c = len(targets[i])  # token 0 from the context's last position, token j from segment token j-1
                row_idx += [b] * c
                pos_idx += [len(row.context) - 1, *range(offsets[k], offsets[k] + c - 1)]
                tgt += targets[i]
                owner += [i] * c
        extra = {}
        if any(len(row.segments) > 1 for row in batch):
            mask, positions = _packed_inputs(batch, width, dtype)
            extra = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
        first = min(pos_idx)
        logits = forward_logits(model, ids.to(device), keep_last=width - first, **extra)
        picked = logits[torch.tensor(row_idx), torch.tensor(pos_idx) - first].float().log_softmax(-1).cpu()
        tgt_t, owner_t = torch.tensor(tgt), torch.tensor(owner)
        token_lp = picked.gather(1, tgt_t[:, None]).squeeze(1).double()
        logprob.index_add_(0, owner_t, token_lp)
        miss = (picked.argmax(-1) != tgt_t).long()
        greedy &= torch.zeros(len(requests), dtype=torch.long).index_add_(0, owner_t, miss) == 0
        bar.update(sum(len(row.members) for row in batch))
    bar.close()
    return [Score(float(lp), len(t), bool(g)) for lp, t, g in zip(logprob.tolist(), targets, greedy.tolist())]
