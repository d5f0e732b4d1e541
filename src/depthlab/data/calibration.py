"""`calibration_sample`: the seeded, recorded token sample the analysis metrics run on (SPEC §1).

It must come from held-out text (never training text; a defect of prior code), be reproducible from its recorded
provenance, and be tokenized with the analysed model's own tokenizer. By default it is drawn from the Shakespeare
plays the default dataset holds out (`HELDOUT_PLAYS`); for a depthlab run, `run_heldout` finds the documents that run
held out (its dataset's validation split, whichever seed chose it). `calibration_samples` adds the disjoint fit
sample the usefulness maps are fitted on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from depthlab.data.dataset import TokenDataset
from depthlab.data.sampling import seeded_order
from depthlab.data.sources import FILE_SUFFIXES, HELDOUT_PLAYS, Document, open_source, shakespeare_corpus
from depthlab.errors import DataError


def calibration_sample(tokenizer, text: str | Path | None = None, num_samples: int = 64, seq_len: int = 512,
                       seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``num_samples`` windows of ``seq_len`` tokens, as LongTensor [N, T], and their provenance.

    text: None for the held-out Shakespeare plays; a prepared dataset folder for its validation documents; a
    .txt/.jsonl/.parquet file or folder; or the text itself (a string that is not an existing path and does not
    look like one).

    The documents are tokenized with ``tokenizer`` (no special tokens added), joined by its eos token if it has one,
    and cut into consecutive non-overlapping windows; a seeded hash picks ``num_samples`` of them, in that order, so
    a smaller sample is a prefix of a larger one with the same seed. Provenance: source, the documents used, seed,
    num_samples, seq_len, sha256 of the sampled token ids (int64, row-major) and of the text.
    """
    ids, _, provenance = calibration_samples(tokenizer, text, num_samples, seq_len, seed=seed)
    return ids, provenance


def calibration_samples(tokenizer, text: str | Path | None = None, num_samples: int = 64, seq_len: int = 512,
                        fit_samples: int = 0, fit_seq_len: int | None = None, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """An evaluation sample as `calibration_sample` draws it, plus a disjoint fit sample → (ids, fit_ids, provenance).

    The fit sample (for the usefulness maps) is ``fit_samples`` windows of ``fit_seq_len`` tokens (default
    ``seq_len``) on their own grid over the same token stream, drawn by the same seeded hash from the windows that
    overlap no evaluation window; None when ``fit_samples`` is 0. Its provenance is under ``fit``.
    """
    if num_samples < 1 or seq_len < 1:
        raise DataError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    fit_seq_len = seq_len if fit_seq_len is None else fit_seq_len
    if fit_samples < 0 or fit_seq_len < 1:
        raise DataError(f"fit_samples must be >= 0 and fit_seq_len positive, got {fit_samples} and {fit_seq_len}")
    documents, source = _calibration_documents(text)
    texts = [doc.text for doc in documents]
    if not texts:
        raise DataError(f"calibration text ({source}) is empty: it holds no document with text")
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = np.fromiter((t for seq in encoded for t in (*seq, *separator)), dtype=np.int64)
    n_windows = len(ids) // seq_len
    if n_windows < num_samples:
        raise DataError(f"calibration text ({source}) has {len(ids):,} tokens, {n_windows} windows of {seq_len}; "
                        f"{num_samples} were requested: give more text, fewer samples or a shorter seq_len")
    starts = seeded_order(n_windows, seed)[:num_samples] * seq_len
    input_ids = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len)])
    text_digest = hashlib.sha256()
    for t in texts:
        text_digest.update(t.encode("utf-8"))
    provenance = {"source": source, "documents": [doc.name for doc in documents], "seed": seed,
                  "num_samples": num_samples, "seq_len": seq_len, "token_sha256": token_sha256(input_ids),
                  "text_sha256": text_digest.hexdigest(), "tokens_available": len(ids)}
    if fit_samples == 0:
        return input_ids, None, provenance
    taken = np.zeros(len(ids) + 1, dtype=np.int64)  # prefix count of evaluation tokens
    np.add.at(taken, (starts[:, None] + np.arange(seq_len)).ravel() + 1, 1)
    taken = taken.cumsum()
    grid = np.arange(len(ids) // fit_seq_len) * fit_seq_len
    free = grid[taken[grid + fit_seq_len] == taken[grid]]
    if len(free) < fit_samples:
        raise DataError(f"calibration text ({source}) has {len(ids):,} tokens: {len(free)} windows of "
                        f"{fit_seq_len} outside the evaluation sample, {fit_samples} fit windows were requested "
                        f"({fit_samples * fit_seq_len:,} tokens): give more text or a smaller fit sample")
    fit_starts = free[seeded_order(len(free), seed)[:fit_samples]]
    fit_ids = torch.from_numpy(ids[fit_starts[:, None] + np.arange(fit_seq_len)])
    provenance["fit"] = {"num_samples": fit_samples, "seq_len": fit_seq_len, "token_sha256": token_sha256(fit_ids),
                         "disjoint_from_eval": True}
    return input_ids, fit_ids, provenance


def token_sha256(input_ids: torch.Tensor) -> str:
    """The hash results files record for a token sample: sha256 of its ids as little-endian int64, row-major."""
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def run_heldout(model) -> tuple[Path | None, bool | None]:
    """Where the held-out text of the run that trained `model` is, and whether it is disjoint from its training text.

    A depthlab model loaded from a run knows its checkpoint; the run's config names its prepared dataset, whose
    validation documents are the documents that run held out, whatever seed split them → (dataset folder, True).
    The bundled default dataset (empty ``data.path``) holds out `HELDOUT_PLAYS` → (None, True). Any other model's
    training text is unknown → (None, None).
    """
    checkpoint = getattr(model, "checkpoint_path", None)
    if checkpoint is None:
        return None, None
    from depthlab.rundir import RunDir

    run = RunDir.of(checkpoint)
    path = run.read_config().get("data", {}).get("path") or ""
    if not path:
        return None, True
    dataset = Path(path).expanduser()
    if not (dataset / "meta.json").exists():
        raise DataError(f"run {run.path} was trained on the dataset {path}, which is gone: its held-out split is "
                        "unknown; give held-out text explicitly (--data)")
    return dataset, True


def _calibration_documents(text: str | Path | None) -> tuple[list[Document], str]:
    if text is None:
        return list(shakespeare_corpus(HELDOUT_PLAYS).documents()), f"shakespeare:{','.join(HELDOUT_PLAYS)}"
    if isinstance(text, str) and not _names_path(text):
        return [Document("text", text)], f"text ({len(text):,} characters)"
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"calibration text {text} does not exist")
    if (path / "meta.json").exists():
        return TokenDataset(path).val_documents(), f"{path.resolve()} (validation split)"
    corpus = open_source(path)
    return list(corpus.documents()), corpus.name


def _names_path(text: str) -> bool:
    """A string is taken as a path when it exists or looks like one (one line ending in a corpus suffix or a
    slash); anything else is the text itself."""
    if "\n" in text:
        return False
    try:
        exists = Path(text).expanduser().exists()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte: text, not a path
        exists = False
    return exists or text.rstrip().endswith((*FILE_SUFFIXES, "/"))
