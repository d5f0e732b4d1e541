"""Tokenizers: train a byte-level BPE on a corpus, or use any Hugging Face fast tokenizer.

Either way the result is a `transformers.PreTrainedTokenizerFast` with an end-of-text token, because that is what
the rest of depthlab (training, sampling, export, analysis of HF models) speaks. A prepared dataset stores its
tokenizer as a single ``tokenizer.json`` plus the special-token names in meta.json.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from depthlab.errors import DataError
from depthlab.fileio import record_checksum

EOT = "<|endoftext|>"
"""The end-of-text token a trained BPE appends after every document."""

MIN_VOCAB_SIZE = 258
"""256 byte symbols + the end-of-text token + at least one merge."""
MAX_VOCAB_SIZE = 2**24
"""The largest BPE depthlab asks for (16.8M; real vocabularies are below 1M): the tokenizers trainer reserves ~66 bytes
per requested entry up front (2^30 entries: 70 GB) and aborts the whole process, uncatchably, when that fails."""


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``, as a PreTrainedTokenizerFast whose eos token is ``<|endoftext|>``.

    Byte-level means every string round-trips (no unknown tokens). Training is deterministic for the same texts in
    the same order. On a small corpus the vocabulary can end below ``vocab_size`` when no pair is left to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT)


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocabulary too small to hold the byte alphabet, the end-of-text token and one merge, or too
    large for the tokenizers library."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small for a byte-level BPE: need at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + {EOT} + one merge)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too large for a byte-level BPE: at most {MAX_VOCAB_SIZE}")


def load_tokenizer(spec: str | Path):
    """A Hugging Face fast tokenizer from a ``tokenizer.json`` file, a local folder, or a hub id (never running
    remote code). It must have an end-of-text (eos) token, which separates documents in the token shards."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            if path.name != "tokenizer.json" and path.suffix != ".json":
                raise DataError(f"tokenizer file {path} is not a tokenizer.json")
            if (path.parent / "tokenizer_config.json").exists():  # it knows its special tokens
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
            else:
                tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
                tokenizer.eos_token = _guess_eos(tokenizer)
        elif path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        elif _looks_like_path(str(spec)):
            raise DataError(f"tokenizer path {spec} does not exist")
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(spec))
    except DataError:
        raise
    except Exception as e:  # transformers/hub raise OSError, ValueError, HTTP errors...; the user needs one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer '{spec}': {first_line}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer '{spec}' has no fast (tokenizers-backed) version; depthlab needs one")
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer '{spec}' has no end-of-text (eos) token to separate documents")
    return tokenizer


def tokenizer_from_file(path: Path, special_tokens: dict[str, str]):
    """Reopen a tokenizer saved in a prepared dataset, with the special tokens meta.json recorded."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **special_tokens)
    except Exception as e:  # a truncated or foreign tokenizer.json surfaces as a tokenizers parse error
        raise DataError(f"cannot read tokenizer {path}: {e}") from e


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a run or model folder, plus the ``tokenizer.json.sha256`` sidecar that loading checks
    (`depthlab.fileio.record_checksum`); a slow tokenizer writes no tokenizer.json and gets none."""
    tokenizer.save_pretrained(folder)
    if (Path(folder) / "tokenizer.json").is_file():
        record_checksum(Path(folder) / "tokenizer.json")


def special_tokens(tokenizer) -> dict[str, str]:
    """The named special tokens (bos/eos/unk/pad/...) of a tokenizer, for saving beside its tokenizer.json."""
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


_EOS_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")


def _guess_eos(tokenizer) -> str | None:
    """The end-of-text token of a bare tokenizer.json (which records no special-token roles): a well-known eos
    among its special tokens."""
    added = {t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    return next((t for t in _EOS_CANDIDATES if t in added), None)


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist was meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1 or "\\" in spec
