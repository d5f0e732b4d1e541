"""Greedy generation until a stop string, batched: the engine behind the generative tasks.

Semantics follow lm-evaluation-harness's Hugging Face backend (``HFLM.generate_until``), so the outputs match:
- a prompt is tokenized with the tokenizer's default special tokens and, when too long, keeps its last
  ``context_length - max_gen_toks`` tokens;
- decoding is greedy (argmax) for at most ``max_gen_toks`` new tokens, and a sequence is finished once its decoded
  new text contains a stop string or it produced the end-of-sequence token;
- the output is the new tokens decoded without special tokens, cut before the first occurrence of each stop string
  in turn (the decoded EOS token is one of them).

Greedy decoding is deterministic, so batching changes no output beyond floating-point reassociation. Prompts are
sorted by length (longest first) and cut into batches of at most ``batch_size`` rows and ``max_tokens`` tokens of
prompt plus generation. Hugging Face models run ``model.generate`` on left-padded rows with their KV cache, as lm-eval
does; other models (depthlab's ``Transformer``, whose ``forward`` takes no attention mask) get batches of prompts with
the same length, which need no padding, and a plain greedy loop.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from depthlab.errors import EvalError
from depthlab.eval.scorer import context_length, forward_logits, model_device, token_batches


def _stops(tokenizer, until: tuple[str, ...]) -> list[str]:
    """The stop strings plus the decoded EOS token (lm-eval's ``handle_stop_sequences``)."""
    stops = [s for s in until if s]
    if tokenizer.eos_token_id is not None:
        eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
        if eos and eos not in stops:
            stops.append(eos)
    return stops


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _finished(tokenizer, new_ids: torch.Tensor, stops: list[str], eos: int | None) -> torch.Tensor:
    """Per row: the new tokens hold EOS or decode to text containing a stop string."""
    texts = tokenizer.batch_decode(new_ids.tolist(), skip_special_tokens=False)
    done = torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool)
    if eos is not None:
        done |= (new_ids.cpu() == eos).any(dim=1)
    return done


def _generate_hf(model, tokenizer, rows: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EvalError("the tokenizer has neither a pad nor an EOS token; batched generation needs one for padding")
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):  # left padding: every row's next token is at the same index
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return _finished(tokenizer, input_ids[:, width:], stops, tokenizer.eos_token_id).to(input_ids.device)

    device = model_device(model)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         stopping_criteria=StoppingCriteriaList([StopStrings()]), use_cache=True)
    return out[:, width:].tolist()


def _generate_plain(model, tokenizer, rows: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
    """Greedy loop for equal-length rows (no padding, so no mask), stopping when every row is finished."""
    device = model_device(model)
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    width = ids.shape[1]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new):
        nxt = forward_logits(model, ids, keep_last=1)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        done |= _finished(tokenizer, ids[:, width:], stops, tokenizer.eos_token_id)
        if bool(done.all()):
            break
    return ids[:, width:].tolist()


@torch.no_grad()
def generate_until(model, tokenizer, prompts: list[str], *, until: tuple[str, ...], max_gen_toks: int = 256,
                   batch_size: int = 64, max_tokens: int = 2048, max_length: int | None = None,
                   progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt, cut before the first stop string; one string per prompt, in order.

    max_length: the model's context (default: from its config); a prompt keeps its last ``max_length -
    max_gen_toks`` tokens. batch_size, max_tokens: at most this many rows and tokens (prompt + generation) per batch.
    """
    from transformers import GenerationMixin

    if batch_size < 1 or max_tokens < 1 or max_gen_toks < 1:
        raise EvalError(f"batch_size, max_tokens and max_gen_toks must be >= 1, got {batch_size}, {max_tokens} and "
                        f"{max_gen_toks}")
    max_len = max_length or context_length(model)
    if max_gen_toks >= max_len:
        raise EvalError(f"max_gen_toks ({max_gen_toks}) must be below the model's context ({max_len})")
    stops = _stops(tokenizer, until)
    encoded = [ids[-(max_len - max_gen_toks):] for ids in tokenizer(list(prompts))["input_ids"]]
    if any(not ids for ids in encoded):
        raise EvalError("a prompt tokenizes to nothing; every task prompt must give the model some text")
    hf = isinstance(model, GenerationMixin)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    # plain rows must have one length per batch: cut the sorted order wherever the length changes
    runs = [order] if hf else [[i for i in order if len(encoded[i]) == n]
                               for n in sorted({len(e) for e in encoded}, reverse=True)]
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False)
    for run in runs:
        for batch in token_batches(run, batch_size, max_tokens, length=lambda i: len(encoded[i]) + max_gen_toks):
            rows = [encoded[i] for i in batch]
            new = (_generate_hf if hf else _generate_plain)(model, tokenizer, rows, max_gen_toks, stops)
            for i, tokens in zip(batch, new):
                if tokenizer.eos_token_id in tokens:  # what follows EOS is padding (or, in a plain batch, junk)
                    tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
                outputs[i] = _cut(tokenizer.decode(tokens, skip_special_tokens=True), stops)
            bar.update(len(batch))
    bar.close()
    return outputs
