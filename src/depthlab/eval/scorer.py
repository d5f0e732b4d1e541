"""Log-likelihood of continuations given contexts: the engine behind downstream accuracy.

Semantics follow lm-evaluation-harness's Hugging Face backend exactly, so the decisions match:
- trailing spaces of a context move to the front of its continuation; the pair is tokenized as ``context +
  continuation`` and the continuation's tokens are whatever follows the context's own tokenization;
- strings are tokenized with the tokenizer's default special tokens (a BOS where the tokenizer adds one);
- a sequence longer than the model's context keeps its last ``context_length + 1`` tokens.
- a continuation longer than the context itself (no single window can hold it) is scored in windows, as rolling
  log-likelihood is: pieces of at most half the context, each token conditioned on at least half a context of the
  tokens before it; its Score sums the pieces. Continuations that fit are scored exactly as above.

What makes it fast, without changing any number:
- **Shared prefixes run once.** A causal model's logits at a token depend only on the tokens before it. The choices
  of one example share their context (and often more: PIQA's two solutions tend to start alike, Winogrande's two
  contexts differ in one word), so all of an example's requests go into one row laid out as a prefix tree: every
  distinct prefix appears once, a 4D attention mask lets each token see exactly its ancestors, and its position id
  is its depth. Each request is then computed exactly as if it were alone, and single-token choices (MMLU's letters,
  BoolQ's yes/no) or duplicated requests cost nothing extra. Models whose ``forward`` takes no ``attention_mask`` and
  ``position_ids`` (depthlab's own) get plain rows instead, one per distinct input that is no other's prefix.
- **Rows sorted by length, batched by a token budget, right-padded.** Sorting keeps padding small; padding after the
  real tokens cannot affect them, so rows that are plain sequences need no mask at all.
- **Only the needed logits.** Hugging Face models that accept ``logits_to_keep`` compute the LM head only over the
  window that holds continuation positions; log-softmax runs in fp32 only on the continuation positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.errors import EvalError
from depthlab.model.view import CONTEXT_KEYS, ModelView


@dataclass(frozen=True)
class Score:
    """Summed log-probability (nats) of a continuation, its token count, and whether greedy decoding yields it."""

    logprob: float
    n_tokens: int
    greedy: bool


def context_length(model) -> int:
    """The longest sequence the model accepts (`ModelView.context`: Hugging Face or depthlab config keys)."""
    value = ModelView(model).context
    if value is None:
        raise EvalError(f"cannot tell the context length of {type(model).__name__}: its config has none of "
                        f"{', '.join(CONTEXT_KEYS)}; pass the length explicitly (max_length= to score, "
                        "context_length= for perplexity)")
    return value


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
    """One batch row: the prefix tree of some requests' input tokens, in depth-first order.

    Token ``q`` has position id ``depth[q]`` and its subtree spans ``q..end[q]``, so ``k`` is an ancestor of ``q``
    (or ``q`` itself) exactly when ``k <= q <= end[k]``. ``reads`` holds, per request, the tokens whose logits predict
    its continuation.
    """

    tokens: list[int]
    depth: list[int]
    end: list[int]
    reads: list[tuple[int, list[int]]]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_sequence(self) -> bool:
        """A single path: plain causal attention, positions 0..n-1."""
        return self.depth[-1] == len(self.tokens) - 1


def _prefix_tree(inputs: list[tuple[int, ...]], members: list[int], n_targets: list[int]) -> _Row:
    """The row holding ``members``' inputs. Inserting them in lexicographic order creates the tree's tokens in
    depth-first order (the inputs below any prefix are consecutive in that order)."""
    tokens, depth, parent, reads = [], [], [], []
    child: dict[tuple[int, int], int] = {}
    for i in sorted(members, key=inputs.__getitem__):
        node, path = -1, []
        for token in inputs[i]:
            if (node, token) not in child:
                child[node, token] = len(tokens)
                tokens.append(token)
                depth.append(len(path))
                parent.append(node)
            node = child[node, token]
            path.append(node)
        reads.append((i, path[len(path) - n_targets[i]:]))
    end = list(range(len(tokens)))
    for q in reversed(range(len(tokens))):
        if parent[q] >= 0:
            end[parent[q]] = max(end[parent[q]], end[q])
    return _Row(tokens, depth, end, reads)


def _tree_inputs(rows: list[_Row], width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4D attention mask [B, 1, T, T] (each token sees its ancestors and itself; padding only itself)
    and the position ids [B, T] of a batch of rows."""
    index = torch.arange(width)
    end = index.repeat(len(rows), 1)
    depth = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        end[b, :len(row)] = torch.tensor(row.end)
        depth[b, :len(row)] = torch.tensor(row.depth)
    allowed = (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] <= end[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], depth


def token_batches(items: list, batch_size: int, max_tokens: int, length=len):
    """Consecutive items (sorted longest first) up to ``batch_size`` items and ``max_tokens`` padded tokens."""
    start = 0
    while start < len(items):
        n = max(1, min(batch_size, max_tokens // length(items[start])))
        yield items[start:start + n]
        start += n


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, groups: list | None = None,
                   batch_size: int = 64, max_tokens: int = 2048, max_length: int | None = None,
                   pack: bool | None = None, progress: bool = False) -> list[Score]:
    """Score each (context, continuation) request with ``model``; one ``Score`` per request, in input order.

    groups: a key per request; requests with the same key share one prefix-tree row (pass the example index so an
    example's choices share their context); by default requests with the same context tokens do.
    batch_size, max_tokens: at most this many rows and padded tokens per forward pass.
    pack: use prefix-tree rows (default: when ``model.forward`` takes ``attention_mask`` and ``position_ids``).
    Results depend on none of these, up to floating-point reassociation in the model's kernels.
    """
    if batch_size < 1 or max_tokens < 1:
        raise EvalError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}")
    max_len = max_length or context_length(model)
    pack = _accepts(model, "attention_mask", "position_ids") if pack is None else pack
    inputs, targets, request_of, piece_keys = [], [], [], []  # one entry per scored piece
    for r, (context_ids, continuation_ids) in enumerate(encode_pairs(tokenizer, requests)):
        sequence = context_ids + continuation_ids
        pieces = _pieces(len(sequence), len(continuation_ids), max_len)
        for k, (start, end) in enumerate(pieces):
            inputs.append(tuple(sequence[max(0, end - max_len - 1):end - 1]))
            targets.append(continuation_ids[start - len(context_ids):end - len(context_ids)])
            request_of.append(r)
            piece_keys.append(None if len(pieces) == 1 else ("piece", r, k))  # a window of its own
    if pack:
        keys = [key if key is not None else (groups[r] if groups is not None else seq[:len(seq) - len(t) + 1])
                for key, r, seq, t in zip(piece_keys, request_of, inputs, targets)]
    else:
        keys = _plan_rows(inputs)[1]
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    n_targets = [len(t) for t in targets]
    rows = sorted((_prefix_tree(inputs, m, n_targets) for m in members.values()), key=len, reverse=True)

    device = model_device(model)
    dtype = next(model.parameters()).dtype
    logprob = torch.zeros(len(inputs), dtype=torch.float64)
    greedy = torch.ones(len(inputs), dtype=torch.bool)
    bar = tqdm(total=len(inputs), desc="scoring", unit="req", disable=not progress, leave=False)
    for batch in token_batches(rows, batch_size, max_tokens):
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        row_idx, pos_idx, tgt, owner = [], [], [], []
        for b, row in enumerate(batch):
            ids[b, :len(row)] = torch.tensor(row.tokens)
            for i, nodes in row.reads:
                row_idx += [b] * len(nodes)
                pos_idx += nodes
                tgt += targets[i]
                owner += [i] * len(nodes)
        extra = {}
        if not all(row.is_sequence for row in batch):
            mask, positions = _tree_inputs(batch, width, dtype)
            extra = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
        first = min(pos_idx)
        logits = forward_logits(model, ids.to(device), keep_last=width - first, **extra)
        picked = logits[torch.tensor(row_idx), torch.tensor(pos_idx) - first].float().log_softmax(-1).cpu()
        tgt_t, owner_t = torch.tensor(tgt), torch.tensor(owner)
        token_lp = picked.gather(1, tgt_t[:, None]).squeeze(1).double()
        logprob.index_add_(0, owner_t, token_lp)
        miss = (picked.argmax(-1) != tgt_t).long()
        greedy &= torch.zeros(len(inputs), dtype=torch.long).index_add_(0, owner_t, miss) == 0
        bar.update(sum(len(row.reads) for row in batch))
    bar.close()
    owner = torch.tensor(request_of)
    total = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, owner, logprob)
    misses = torch.zeros(len(requests), dtype=torch.long).index_add_(0, owner, (~greedy).long())
    lengths = torch.tensor([len(t) for t in targets])
    n_tokens = torch.zeros(len(requests), dtype=torch.long).index_add_(0, owner, lengths)
    return [Score(float(lp), int(n), not m) for lp, n, m in zip(total.tolist(), n_tokens.tolist(), misses.tolist())]


def _pieces(n_sequence: int, n_continuation: int, max_len: int) -> list[tuple[int, int]]:
    """[start, end) spans of the sequence to score: the whole continuation when it fits the context, else pieces of
    at most max_len // 2 tokens, so that each token sees at least max_len - max_len // 2 tokens before it."""
    start = n_sequence - n_continuation
    if n_continuation <= max_len:
        return [(start, n_sequence)]
    stride = max(1, max_len // 2)
    return [(s, min(s + stride, n_sequence)) for s in range(start, n_sequence, stride)]
