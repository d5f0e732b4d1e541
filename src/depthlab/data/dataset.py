"""`TokenDataset`: read a prepared dataset folder (written by `prepare_data`).

Layout of a folder::

    tokenizer.json   the tokenizer (special-token roles are in meta.json)
    train.bin        training tokens, raw little-endian uint16/uint32, documents each followed by end-of-text
    val.bin          validation tokens, same format
    val_text.txt     the validation documents' text, each followed by a blank line (offsets in documents.jsonl)
    documents.jsonl  one line per document: name, split, token offset/count in its shard (+ char offset/count
                     in val_text.txt for validation documents)
    meta.json        written last: source, tokenizer (and its sha256), vocab size, dtype, per-split counts and sha256,
                     fingerprint
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from depthlab.data.sources import Document
from depthlab.data.tokenizer import tokenizer_from_file
from depthlab.errors import DataError
from depthlab.fileio import file_sha256

FORMAT = "depthlab-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
FILES = ("tokenizer.json", "train.bin", "val.bin", "val_text.txt", "documents.jsonl", "meta.json")


class TokenDataset:
    """A prepared dataset folder: memory-mapped token splits, its tokenizer and its metadata.

    Opening checks that the folder is finished (meta.json exists and parses) and that each shard has the size
    meta.json promises; `verify()` additionally re-hashes the shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            state = "is a file, not a folder" if self.path.exists() else "does not exist"
            raise DataError(f"dataset folder {self.path} {state} (create one with 'depthlab data prepare --out "
                            "DIR')")
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            state = "is empty" if not any(self.path.iterdir()) else "has no meta.json (preparation did not finish?)"
            raise DataError(f"{self.path} {state}: not a prepared dataset (run 'depthlab data prepare --out "
                            f"{self.path}')")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
                raise DataError(f"{meta_path} is not a depthlab dataset description")
            if self.meta.get("format_version", 0) > FORMAT_VERSION:
                raise DataError(f"{self.path} was prepared by a newer depthlab (format version "
                                f"{self.meta['format_version']}); upgrade depthlab")
            self.dtype = np.dtype(self.meta["dtype"])
            sizes = {s: self.meta["splits"][s]["tokens"] * self.dtype.itemsize for s in SPLITS}
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); prepare the dataset again with "
                            "--overwrite") from e
        for name in ("tokenizer.json", *(f"{s}.bin" for s in SPLITS)):
            if not (self.path / name).is_file():
                raise DataError(f"{self.path} is corrupt: {name} is missing; prepare it again with --overwrite")
        for split, size in sizes.items():
            actual = (self.path / f"{split}.bin").stat().st_size
            if actual != size:
                raise DataError(f"{self.path} is corrupt: {split}.bin has {actual} bytes, meta.json promises "
                                f"{size}; prepare it again with --overwrite")
        self._splits: dict[str, np.memmap] = {}

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id: the embedding size a model for this data needs."""
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        """The end-of-text token id that follows every document in the shards."""
        return int(self.meta["tokenizer"]["eos_id"])

    def split(self, name: str) -> np.memmap:
        """The read-only token memmap of split ``train`` or ``val``."""
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}': expected one of {', '.join(SPLITS)}")
        if name not in self._splits:
            self._splits[name] = np.memmap(self.path / f"{name}.bin", dtype=self.dtype, mode="r")
        return self._splits[name]

    def tokenizer(self):
        """The dataset's tokenizer as a `transformers.PreTrainedTokenizerFast` (eos token set), checked against the
        sha256 in meta.json (datasets prepared before it was recorded have none)."""
        self._check_tokenizer()
        return tokenizer_from_file(self.path / "tokenizer.json", self.meta["tokenizer"]["special_tokens"])

    def _check_tokenizer(self) -> None:
        path, recorded = self.path / "tokenizer.json", self.meta["tokenizer"].get("file_sha256")
        if recorded and file_sha256(path) != recorded:
            raise DataError(f"{path} is corrupt: it does not match its sha256 in meta.json; prepare the dataset "
                            "again with --overwrite")

    def documents(self) -> Iterator[dict]:
        """The document list, in shard order: name, split, token offset and count (+ char offset/count for val)."""
        try:
            with open(self.path / "documents.jsonl", encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {self.path / 'documents.jsonl'}: {e}") from e

    def val_documents(self) -> list[Document]:
        """The held-out documents as text, recovered from val_text.txt."""
        with open(self.path / "val_text.txt", encoding="utf-8", newline="") as f:
            text = f.read()
        return [Document(d["name"], text[d["char_offset"]:d["char_offset"] + d["chars"]])
                for d in self.documents() if d["split"] == "val"]

    def verify(self) -> None:
        """Re-hash the tokenizer and every shard and compare with meta.json; raises DataError on a mismatch."""
        self._check_tokenizer()
        for split in SPLITS:
            if file_sha256(self.path / f"{split}.bin") != self.meta["splits"][split]["sha256"]:
                raise DataError(f"{self.path} is corrupt: {split}.bin does not match its sha256 in meta.json; "
                                "prepare it again with --overwrite")

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.meta['splits'][s]['tokens']:,}" for s in SPLITS)
        return f"TokenDataset({str(self.path)!r}, vocab={self.vocab_size}, tokens: {counts})"
