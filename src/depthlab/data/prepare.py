"""`prepare_data`: turn a corpus into a tokenizer and packed token shards (layout in `depthlab.data.dataset`).

The steps, each a pass over the corpus: read it once to count documents and fingerprint its content; split it by
document (seeded); train the BPE on the training documents only (or load a Hugging Face tokenizer); encode every
document, appending end-of-text, straight into the shard files. Everything goes to temporary files that are renamed
into place at the end, meta.json last, so a folder with a meta.json is always complete. Preparing the same settings
and content again finds the fingerprint in meta.json and returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from collections.abc import Iterator
from itertools import islice, pairwise
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from depthlab import __version__
from depthlab.data.dataset import FILES, FORMAT, FORMAT_VERSION, SPLITS, TokenDataset
from depthlab.data.sampling import seeded_order
from depthlab.data.sources import Corpus, Document, open_source
from depthlab.data.tokenizer import check_vocab_size, load_tokenizer, special_tokens, train_bpe
from depthlab.errors import DataError
from depthlab.fileio import file_sha256

CHUNKS_PER_DOCUMENT = 100
"""A single-document corpus is cut into this many contiguous pieces, which are then split like documents."""

LOCK_FILE = ".lock"
"""Serialises concurrent prepares of one folder; it stays in the folder (deleting lock files races)."""

_ENCODE_BATCH = 256  # documents per `encode_batch` call: enough to keep the Rust tokenizer's threads busy


def cache_dir() -> Path:
    """Where depthlab caches prepared data: ``$DEPTHLAB_CACHE``, else ``~/.cache/depthlab``."""
    return Path(os.environ.get("DEPTHLAB_CACHE") or Path.home() / ".cache" / "depthlab").expanduser()


def default_dataset_dir(vocab_size: int = 4096) -> Path:
    """The cache folder of the bundled corpus prepared with a BPE of ``vocab_size``."""
    return cache_dir() / "data" / f"shakespeare-bpe{vocab_size}"


def default_dataset(vocab_size: int = 4096) -> Path:
    """The bundled Shakespeare corpus with a trained BPE, prepared into the cache on first use."""
    return prepare_data("shakespeare", default_dataset_dir(vocab_size), "bpe", vocab_size)


def split_documents(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``n`` documents are held out (bool mask): ``round(val_fraction·n)`` of them, at least one and at most
    ``n − 1``, chosen by a seeded hash of their indices (so the choice is stable across numpy versions)."""
    if n < 2:
        raise DataError(f"cannot split {n} document(s) into train and validation")
    is_val = np.zeros(n, dtype=bool)
    is_val[seeded_order(n, seed)[:min(n - 1, max(1, round(val_fraction * n)))]] = True
    return is_val


def prepare_data(source: str | Path = "shakespeare", out: str | Path | None = None, tokenizer: str = "bpe",
                 vocab_size: int = 4096, val_fraction: float = 0.05, seed: int = 0, text_field: str = "text",
                 overwrite: bool = False) -> Path:
    """Prepare ``source`` into the dataset folder ``out`` and return its path.

    source: ``shakespeare`` (bundled), a .txt/.jsonl/.parquet file or folder, or ``hf:NAME[:CONFIG][@SPLIT]``.
    out: the folder; None means the cache folder of the bundled corpus (only for ``shakespeare`` with ``bpe``).
    tokenizer: ``bpe`` (train a byte-level BPE of ``vocab_size``) or a tokenizer.json, folder or hub id.
    val_fraction, seed: the share of documents held out and the seed choosing them.
    text_field: the JSONL field / parquet or dataset column holding the text.
    overwrite: replace a folder that holds a different prepared dataset (otherwise that is an error).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer == "bpe":
        check_vocab_size(vocab_size)
    if out is None:
        if source != "shakespeare" or tokenizer != "bpe":
            raise DataError("an output folder is required (out=... / --out DIR) unless preparing the bundled "
                            "corpus with the bpe tokenizer")
        out = default_dataset_dir(vocab_size)
    out = Path(out).expanduser()
    corpus = open_source(source, text_field)
    units = _Units(corpus, val_fraction, seed)
    tok = None if tokenizer == "bpe" else load_tokenizer(tokenizer)
    settings = {"format_version": FORMAT_VERSION, "source": corpus.name, "source_sha256": units.digest,
                "tokenizer": _tokenizer_identity(tokenizer, tok, vocab_size), "val_fraction": val_fraction,
                "seed": seed, **({"text_field": corpus.text_field} if corpus.text_field else {})}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if _reusable(out, fingerprint, overwrite):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):  # concurrent prepares of one folder (e.g. every DDP rank) run one after the other
        if not _reusable(out, fingerprint, overwrite):
            _write(out, units, tokenizer, tok, vocab_size, settings, fingerprint)
    return out


def _write(out: Path, units: _Units, tokenizer: str, tok, vocab_size: int, settings: dict, fingerprint: str):
    """Train or take the tokenizer, encode the shards and commit every file into ``out``, meta.json last."""
    for stale in out.glob(".*.tmp"):  # left by a killed prepare: under the folder lock no other prepare is writing
        stale.unlink(missing_ok=True)
    staged = {name: out / f".{name}.{os.getpid()}.tmp" for name in FILES}
    try:
        if tok is None:
            tok = train_bpe((doc.text for doc, val in units if not val), vocab_size)
        tok.backend_tokenizer.save(str(staged["tokenizer.json"]))
        vocab = max(tok.get_vocab().values()) + 1
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        splits = _write_shards(units, tok, dtype, staged)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "depthlab_version": __version__,
                "fingerprint": fingerprint, "settings": settings, "source": settings["source"],
                "single_document_chunked": units.chunked,
                "tokenizer": {"kind": "bpe" if tokenizer == "bpe" else "hf", "spec": settings["tokenizer"]["spec"],
                              "special_tokens": special_tokens(tok), "eos_id": tok.eos_token_id,
                              "file_sha256": file_sha256(staged["tokenizer.json"])},
                "vocab_size": vocab, "dtype": dtype.name, "splits": splits,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        staged["meta.json"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (out / "meta.json").unlink(missing_ok=True)  # from here on the folder reads as unfinished until the end
        for name in FILES:  # FILES ends with meta.json
            os.replace(staged[name], out / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an exclusive lock on ``out/.lock`` (POSIX advisory lock; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Units:
    """The corpus as split units, each with its split (``val`` True/False), re-iterable.

    Reading the corpus once here counts its documents and hashes its content. With two or more documents the units
    are the documents; a single document is cut into contiguous pieces which are split like documents, then
    neighbouring pieces of the same split are joined again, so end-of-text marks only real discontinuities.
    """

    def __init__(self, corpus: Corpus, val_fraction: float, seed: int):
        self.corpus = corpus
        digest, n, only = hashlib.sha256(), 0, None
        for doc in tqdm(corpus.documents(), desc="reading", unit="doc", disable=None, leave=False):
            for part in (doc.name, doc.text):
                data = part.encode("utf-8")
                digest.update(len(data).to_bytes(8, "little") + data)
            n += 1
            only = doc if n == 1 else None
        if n == 0:
            raise DataError(f"corpus {corpus.name} is empty: it has no non-empty documents")
        self.digest, self.chunked = digest.hexdigest(), n == 1
        if self.chunked:
            pieces = _chunk(only.text, CHUNKS_PER_DOCUMENT)
            if len(pieces) < 2:
                raise DataError(f"corpus {corpus.name} is too small to split into train and validation: one "
                                f"document of {len(only.text)} characters")
            self.segments = _join_runs(only, pieces, split_documents(len(pieces), val_fraction, seed))
            self.n = len(self.segments)
        else:
            self.is_val, self.n = split_documents(n, val_fraction, seed), n

    def __iter__(self) -> Iterator[tuple[Document, bool]]:
        if self.chunked:
            return iter(self.segments)
        return zip(self.corpus.documents(), (bool(v) for v in self.is_val))


def _chunk(text: str, pieces: int) -> list[tuple[int, int]]:
    """Up to ``pieces`` contiguous (start, end) character ranges covering ``text``, of roughly equal length, cut
    after a line end (after whitespace for a text of one line); whitespace-only ranges are dropped."""
    boundary = re.compile(r"\n" if text.count("\n") >= 2 else r"\s")
    cuts = [0]
    for k in range(1, pieces):
        found = boundary.search(text, max(round(k * len(text) / pieces), cuts[-1]))
        if found is None:
            break
        if cuts[-1] < found.end() < len(text):
            cuts.append(found.end())
    cuts.append(len(text))
    return [(a, b) for a, b in pairwise(cuts) if text[a:b].strip()]


def _join_runs(doc: Document, pieces: list[tuple[int, int]], is_val: np.ndarray) -> list[tuple[Document, bool]]:
    """Merge neighbouring pieces of the same split into one segment named ``NAME[start:end]`` (character range)."""
    segments, first = [], 0
    for i in range(1, len(pieces) + 1):
        if i == len(pieces) or is_val[i] != is_val[first]:
            a, b = pieces[first][0], pieces[i - 1][1]
            segments.append((Document(f"{doc.name}[{a}:{b}]", doc.text[a:b]), bool(is_val[first])))
            first = i
    return segments


def _tokenizer_identity(spec: str, tok, vocab_size: int) -> dict:
    """What fixes the tokenizer: the requested BPE size, or where an existing tokenizer came from and its content."""
    if tok is None:
        return {"spec": "bpe", "vocab_size": vocab_size}
    path = Path(spec).expanduser()
    return {"spec": str(path.resolve()) if path.exists() else spec,
            "sha256": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()}


def _reusable(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when ``out`` already holds this exact dataset intact; raises when it holds something else and
    ``overwrite`` is off. A damaged copy of the same dataset is rebuilt without asking."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    if (out / "meta.json").exists():
        try:
            meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint:
            try:
                TokenDataset(out)
                return True
            except DataError:
                return False
        if overwrite:
            return False
        what = (f"prepared from {meta.get('source')} with tokenizer {meta.get('tokenizer', {}).get('spec')}, "
                f"vocab {meta.get('vocab_size')}" if isinstance(meta, dict) else "with an unreadable meta.json")
        raise DataError(f"{out} already holds a different dataset ({what}); choose another output folder or "
                        "pass --overwrite")
    foreign = [p.name for p in out.iterdir()
               if p.name not in FILES and p.name != LOCK_FILE and not p.name.endswith(".tmp")]
    if foreign and not overwrite:
        raise DataError(f"{out} is not empty and is not a prepared dataset (it holds {foreign[0]}"
                        f"{' …' if len(foreign) > 1 else ''}); choose an empty folder or pass --overwrite")
    return False


def _write_shards(units: _Units, tok, dtype: np.dtype, staged: dict[str, Path]) -> dict:
    """Encode every unit into its split's shard (ids then end-of-text), write the validation text and the document
    list, and return per-split token/document counts and sha256."""
    eos, backend = tok.eos_token_id, tok.backend_tokenizer
    splits = {s: {"file": f"{s}.bin", "tokens": 0, "documents": 0} for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}
    chars = 0
    with (open(staged["train.bin"], "wb") as train, open(staged["val.bin"], "wb") as val,
          open(staged["val_text.txt"], "w", encoding="utf-8", newline="") as val_text,
          open(staged["documents.jsonl"], "w", encoding="utf-8") as listing,
          tqdm(total=units.n, desc="tokenizing", unit="doc", disable=None) as bar):
        shards = {"train": train, "val": val}
        for batch in _batched(units, _ENCODE_BATCH):
            encodings = backend.encode_batch([doc.text for doc, _ in batch], add_special_tokens=False)
            for (doc, is_val), encoding in zip(batch, encodings):
                split = "val" if is_val else "train"
                data = np.asarray([*encoding.ids, eos], dtype=dtype).tobytes()
                shards[split].write(data)
                digests[split].update(data)
                record = {"name": doc.name, "split": split, "token_offset": splits[split]["tokens"],
                          "tokens": len(encoding.ids) + 1}
                if is_val:
                    record |= {"char_offset": chars, "chars": len(doc.text)}
                    val_text.write(doc.text + "\n\n")
                    chars += len(doc.text) + 2
                listing.write(json.dumps(record) + "\n")
                splits[split]["tokens"] += record["tokens"]
                splits[split]["documents"] += 1
            bar.update(len(batch))
    for split in SPLITS:
        splits[split]["sha256"] = digests[split].hexdigest()
    return splits


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch
