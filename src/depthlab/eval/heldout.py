"""Perplexity and bits-per-byte on held-out text, with sliding windows for text longer than the context.

Each document is tokenized with the model's own tokenizer and scored as its own stream, starting after a prefix
token (the tokenizer's BOS, else its EOS, as lm-evaluation-harness's rolling log-likelihood does), so every one of its
tokens is predicted. A document longer than the window is cut into windows of ``context_length`` tokens that advance
by ``stride``: each window scores only the tokens no earlier window scored, so every token is counted exactly once and
sees at least ``context_length - stride`` tokens of context (``stride = context_length``, the default, gives
non-overlapping windows — lm-eval's convention; a smaller stride is slower and closer to unlimited-context
perplexity).

Bits per byte divides the total NLL by ``ln 2`` and by the UTF-8 bytes of the text, which makes models with different
tokenizers comparable; perplexity is per token of the model's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthlab.errors import EvalError
from depthlab.eval.scorer import context_length as model_context_length
from depthlab.eval.scorer import forward_logits, model_device, token_batches


def ppl_documents(source: str | Path) -> tuple[str, list[str]]:
    """(name, documents) of a held-out text source.

    ``shakespeare``: the bundled corpus's held-out plays (the validation documents of the default dataset); a folder:
    a prepared dataset's validation documents; a file (.txt, .jsonl, .parquet) or a folder of them: its text.
    """
    from depthlab.data.sources import HELDOUT_PLAYS, open_source, shakespeare_corpus

    if str(source) == "shakespeare":
        return "shakespeare (held-out plays)", [d.text for d in shakespeare_corpus(HELDOUT_PLAYS).documents()]
    path = Path(source).expanduser()
    if (path / "meta.json").is_file():
        from depthlab.data.dataset import TokenDataset

        return f"{path} (val split)", [d.text for d in TokenDataset(path).val_documents()]
    if not path.exists():
        raise EvalError(f"perplexity data '{source}' not found: expected 'shakespeare', a prepared dataset folder, "
                        "or a .txt/.jsonl/.parquet file")
    return str(path), [d.text for d in open_source(path).documents()]


def _windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of ``n`` tokens whose first token is the prefix: (begin, end, first) means the window
    reads tokens ``begin:end`` and scores the predictions of tokens ``first+1 .. end`` (positions ``first-begin`` ..
    ``end-begin-1`` of its logits)."""
    windows, scored = [], 0  # tokens 1..scored are already predicted
    begin = 0
    while scored < n - 1:
        end = min(begin + length, n - 1)
        windows.append((begin, end, scored))  # stride <= length, so scored >= begin
        scored = end
        begin += stride
    return windows


@torch.no_grad()
def perplexity(model, tokenizer, text: str | Sequence[str] | None = None, *, source: str | Path | None = None,
               context_length: int | None = None, stride: int | None = None, max_tokens: int = 4096,
               progress: bool = False) -> dict:
    """Token-level NLL, perplexity and bits-per-byte of ``model`` on held-out text.

    text: a string or a list of documents; or source: a name or path resolved by ``ppl_documents``.
    context_length: window length in tokens (default: the model's context); stride: how far windows advance
    (default: ``context_length``). max_tokens: padded tokens per forward pass (windows are batched up to it).
    Returns a dict with nll (nats/token), perplexity, bits_per_byte, tokens, bytes, documents, and the settings.
    """
    if (text is None) == (source is None):
        raise EvalError("give exactly one of text= and source=")
    name, docs = ppl_documents(source) if source is not None else (
        "text", [text] if isinstance(text, str) else list(text))
    docs = [d for d in docs if d]
    if not docs:
        raise EvalError(f"perplexity data {name} has no text")
    length = model_context_length(model) if context_length is None else context_length
    if context_length is not None and not 1 <= context_length <= model_context_length(model):
        raise EvalError(f"context_length must be in [1, {model_context_length(model)}] (the model's context), got "
                        f"{context_length}")
    stride = stride or length
    if not 1 <= stride <= length:
        raise EvalError(f"stride must be in [1, context_length={length}], got {stride}")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise EvalError("the tokenizer has neither a BOS nor an EOS token to start each document with")

    streams = [[prefix, *ids] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    jobs = [(s, *w) for s in streams for w in _windows(len(s), length, stride)]
    jobs.sort(key=lambda job: job[2] - job[1], reverse=True)
    device = model_device(model)
    nll, n_tokens = 0.0, 0
    bar = tqdm(total=len(jobs), desc="perplexity", unit="window", disable=not progress, leave=False)
    for batch in token_batches(jobs, len(jobs), max_tokens, length=lambda job: job[2] - job[1]):
        width = batch[0][2] - batch[0][1]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (stream, begin, end, _) in enumerate(batch):
            ids[b, :end - begin] = torch.tensor(stream[begin:end])
        keep = width - min(first - begin for _, begin, _, first in batch)
        logits = forward_logits(model, ids.to(device), keep_last=keep)
        for b, (stream, begin, end, first) in enumerate(batch):
            lo = first - begin - (width - keep)
            rows = logits[b, lo:lo + end - first].float()
            targets = torch.tensor(stream[first + 1:end + 1], device=rows.device)
            nll += F.cross_entropy(rows, targets, reduction="sum").double().item()
            n_tokens += end - first
        bar.update(len(batch))
    bar.close()
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    mean = nll / n_tokens
    return {"source": name, "documents": len(docs), "tokens": n_tokens, "bytes": n_bytes, "nll": mean,
            "perplexity": math.exp(mean), "bits_per_byte": nll / math.log(2) / n_bytes,
            "context_length": length, "stride": stride}
