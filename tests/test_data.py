"""The data pipeline: sources, tokenizers, prepared folders, the deterministic sampler, calibration samples."""

from __future__ import annotations

import json
import random
import time
from itertools import pairwise

import numpy as np
import pytest
import torch

from depthlab.data import (
    EOT,
    HELDOUT_PLAYS,
    TokenDataset,
    calibration_sample,
    default_dataset,
    eval_batches,
    load_tokenizer,
    markdown_to_text,
    open_source,
    prepare_data,
    sample_batch,
    shakespeare_corpus,
    split_documents,
    token_sha256,
    train_bpe,
)
from depthlab.data.dataset import file_sha256
from depthlab.errors import DataError

WORDS = ["thou", "art", "the", "king", "of", "all", "land", "and", "yet", "night", "is", "long", "o", "my", "lord",
         "what", "say", "you", "to", "this", "fair", "morning", "when", "sun", "doth", "rise", "upon", "sea"]


def make_docs(n: int, lines: int = 12, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}.\n" + "\n".join(" ".join(rng.choices(WORDS, k=8)) for _ in range(lines)) + "\n"
            for i in range(n)]


def write_txt_corpus(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """20 documents, 4 held out, BPE of 300."""
    root = tmp_path_factory.mktemp("small")
    docs = make_docs(20)
    source = write_jsonl(root / "corpus.jsonl", docs)
    return prepare_data(source, root / "ds", vocab_size=300, val_fraction=0.2, seed=0), docs


# --- sources -----------------------------------------------------------------------------------------------------

def test_markdown_to_text_keeps_speakers_directions_and_verse():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n**BERNARDO**  \n"
          "Who's there?  \nStand, ho!\n\n__\\[Aside]_  \nA lord &amp; a king \\-- 1\\. *well*\n\n\n\n_Exit_\n")
    assert markdown_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
                                    "BERNARDO:\nWho's there?\nStand, ho!\n\n[Aside]\nA lord & a king -- 1. well\n\n"
                                    "Exit\n")


def test_text_files_jsonl_and_parquet_sources(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_txt_corpus(tmp_path / "c", ["alpha\n", "  \n", "beta\n"])  # the blank file is not a document
    (tmp_path / "c" / "sub").mkdir()
    write_jsonl(tmp_path / "c" / "sub" / "x.jsonl", ["gamma", "", "delta"], field="body")
    pq.write_table(pa.table({"body": ["eps", None, "zeta"]}), tmp_path / "c" / "t.parquet")
    (tmp_path / "c" / "skip.csv").write_text("not read")
    docs = list(open_source(tmp_path / "c", text_field="body").documents())
    assert [(d.name, d.text) for d in docs] == [
        ("doc000.txt", "alpha\n"), ("doc002.txt", "beta\n"), ("sub/x.jsonl:1", "gamma"), ("sub/x.jsonl:3", "delta"),
        ("t.parquet:0", "eps"), ("t.parquet:2", "zeta")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', "x.jsonl:2: not valid JSON"),
    ('{"body": "ok"}\n', "x.jsonl:1: no 'text' field"),
    ('{"text": 3}\n', "is int, not a string"),
])
def test_bad_jsonl_is_reported_with_its_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        list(open_source(tmp_path / "x.jsonl").documents())


def test_missing_unreadable_and_empty_corpora(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_source(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(DataError, match="cannot read .*bad.txt"):
        list(open_source(tmp_path / "bad.txt").documents())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        open_source(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        prepare_data(tmp_path / "blank.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_dataset_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = make_docs(6)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs}),
                          "test": datasets.Dataset.from_dict({"content": docs[:2]})}).save_to_disk(tmp_path / "saved")
    corpus = open_source(f"hf:{tmp_path / 'saved'}@test", text_field="content")
    assert [d.text for d in corpus.documents()] == docs[:2]
    assert corpus.name.endswith("@test")
    with pytest.raises(DataError, match="no split 'validation'"):
        open_source(f"hf:{tmp_path / 'saved'}@validation", text_field="content")
    with pytest.raises(DataError, match="no 'text' column"):
        open_source(f"hf:{tmp_path / 'saved'}")
    path = prepare_data(f"hf:{write_jsonl(tmp_path / 'local.jsonl', docs)}", tmp_path / "ds", vocab_size=280)
    assert TokenDataset(path).meta["splits"]["train"]["documents"] + 1 == len(docs)


def test_hf_hub_names_pass_config_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = open_source("hf:wikitext:wikitext-2-raw-v1@validation")
    assert corpus.name == "hf:wikitext:wikitext-2-raw-v1@validation" and len(list(corpus.documents())) == 2
    open_source("hf:org/name")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("org/name", None, "train")]


# --- tokenizers --------------------------------------------------------------------------------------------------

def test_bpe_round_trips_any_text_and_has_eos():
    tok = train_bpe(make_docs(10), vocab_size=300)
    assert tok.eos_token == EOT and tok.convert_ids_to_tokens(tok.eos_token_id) == EOT
    assert len(tok) == 300
    for text in ["thou art the king", "Ünïcödé — 東京 🎭\n\ttabs", "unseen-words xyz 123"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("the king of all the land")["input_ids"]) < len("the king of all the land")  # merges learnt
    with pytest.raises(DataError, match="too small"):
        train_bpe(["x"], vocab_size=257)


def test_hf_tokenizer_folder_and_file(tmp_path, small_dataset):
    path, docs = small_dataset
    tok = TokenDataset(path).tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.eos_token == EOT
    bare = load_tokenizer(path / "tokenizer.json")  # no tokenizer_config.json beside it: eos is recognised
    assert bare.eos_token_id == tok.eos_token_id
    out = prepare_data(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "ds", tokenizer=str(tmp_path / "tok"),
                       val_fraction=0.2)
    assert TokenDataset(out).meta["tokenizer"]["kind"] == "hf"
    assert np.array_equal(TokenDataset(out).split("train"), TokenDataset(path).split("train"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer("./no/such/tokenizer.json")


def test_shard_dtype_follows_vocabulary_size(tmp_path, small_dataset):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert TokenDataset(small_dataset[0]).split("train").dtype == np.uint16
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, EOT: 70_001}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.add_special_tokens([EOT])
    big.save(str(tmp_path / "tokenizer.json"))
    write_txt_corpus(tmp_path / "c", ["w1 w65535 w65536", "w69999 w2", "w3"])
    ds = TokenDataset(prepare_data(tmp_path / "c", tmp_path / "ds", tokenizer=str(tmp_path / "tokenizer.json"),
                                   val_fraction=0.3))
    assert ds.meta["dtype"] == "uint32" and ds.vocab_size == 70_002
    everything = sorted(np.concatenate([ds.split("train"), ds.split("val")]).tolist())
    assert everything == sorted([1, 65535, 65536, 70_001, 69999, 2, 70_001, 3, 70_001])


# --- prepared folders --------------------------------------------------------------------------------------------

def test_split_documents_sizes_and_determinism():
    for n, fraction in [(2, 0.01), (2, 0.99), (10, 0.05), (10, 0.31), (1000, 0.05)]:
        mask = split_documents(n, fraction, seed=3)
        assert mask.sum() == min(n - 1, max(1, round(fraction * n)))
        assert np.array_equal(mask, split_documents(n, fraction, seed=3))
    assert not np.array_equal(split_documents(1000, 0.05, 0), split_documents(1000, 0.05, 1))
    with pytest.raises(DataError):
        split_documents(1, 0.5, 0)


def test_shards_are_documents_plus_eos_split_by_document(small_dataset):
    path, docs = small_dataset
    ds = TokenDataset(path)
    tok = ds.tokenizer()
    records = list(ds.documents())
    assert [r["name"] for r in records] == [f"corpus.jsonl:{i + 1}" for i in range(len(docs))]
    val_names = {r["name"] for r in records if r["split"] == "val"}
    expected_val = split_documents(len(docs), 0.2, 0)
    assert val_names == {f"corpus.jsonl:{i + 1}" for i in np.flatnonzero(expected_val)} and len(val_names) == 4
    for split in ("train", "val"):  # brute force: each shard is its documents' ids, each followed by eos
        expected = [t for doc, r in zip(docs, records) if r["split"] == split
                    for t in (*tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
        assert ds.split(split).tolist() == expected
        assert ds.meta["splits"][split]["tokens"] == len(expected)
    assert [d.text for d in ds.val_documents()] == [doc for doc, v in zip(docs, expected_val) if v]


def test_same_settings_give_identical_shards_and_seed_changes_the_split(tmp_path, small_dataset):
    path, docs = small_dataset
    source = write_jsonl(tmp_path / "corpus.jsonl", docs)
    again = TokenDataset(prepare_data(source, tmp_path / "a", vocab_size=300, val_fraction=0.2, seed=0))
    other = TokenDataset(prepare_data(source, tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=1))
    original = TokenDataset(path)
    assert again.meta["splits"] == original.meta["splits"]
    assert (path / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    assert other.meta["splits"]["val"]["sha256"] != original.meta["splits"]["val"]["sha256"]


def test_single_document_is_split_into_contiguous_chunks(tmp_path):
    text = "".join(make_docs(1, lines=400)[0])
    (tmp_path / "one.txt").write_text(text)
    ds = TokenDataset(prepare_data(tmp_path / "one.txt", tmp_path / "ds", vocab_size=280, val_fraction=0.1))
    assert ds.meta["single_document_chunked"]
    records = list(ds.documents())
    spans = [tuple(map(int, r["name"].removeprefix("one.txt[").rstrip("]").split(":"))) for r in records]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in pairwise(spans))  # contiguous, in order
    splits = [r["split"] for r in records]
    assert all(a != b for a, b in pairwise(splits))  # neighbouring pieces of one split are joined
    assert 5 <= ds.meta["splits"]["val"]["tokens"] * 100 / (ds.meta["splits"]["train"]["tokens"] + 1) <= 20
    assert [d.text for d in ds.val_documents()] == [text[a:b] for (a, b), s in zip(spans, splits) if s == "val"]
    (tmp_path / "tiny.txt").write_text("word")
    with pytest.raises(DataError, match="too small to split"):
        prepare_data(tmp_path / "tiny.txt", tmp_path / "tiny")


def test_meta_records_provenance_and_hashes(small_dataset):
    path, _ = small_dataset
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "depthlab-tokens" and meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert meta["source"].endswith("corpus.jsonl") and meta["settings"]["text_field"] == "text"
    assert meta["tokenizer"]["special_tokens"]["eos_token"] == EOT
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (16, 4)
    for split in ("train", "val"):
        assert file_sha256(path / f"{split}.bin") == meta["splits"][split]["sha256"]
    TokenDataset(path).verify()
    assert not list(path.glob("*.tmp"))


def test_corrupt_missing_and_empty_folders_are_refused(tmp_path, small_dataset):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset[0], copy)
    data = bytearray((copy / "val.bin").read_bytes())
    data[0] ^= 1
    (copy / "val.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="val.bin does not match its sha256"):
        TokenDataset(copy).verify()
    (copy / "val.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="val.bin has .* bytes"):
        TokenDataset(copy)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is corrupt"):
        TokenDataset(copy)
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        TokenDataset(tmp_path / "empty")


def test_prepare_is_idempotent_refuses_other_datasets_and_overwrites_on_request(tmp_path):
    source = write_txt_corpus(tmp_path / "c", make_docs(6))
    out = prepare_data(source, tmp_path / "ds", vocab_size=280)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_data(source, out, vocab_size=280) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing rewritten
    with pytest.raises(DataError, match="already holds a different dataset"):
        prepare_data(source, out, vocab_size=290)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing touched
    (source / "doc000.txt").write_text("changed content\n" * 20)  # same settings, different text
    with pytest.raises(DataError, match="already holds a different dataset"):
        prepare_data(source, out, vocab_size=280)
    prepare_data(source, out, vocab_size=290, overwrite=True)
    assert TokenDataset(out).meta["settings"]["tokenizer"]["vocab_size"] == 290
    (out / "val.bin").write_bytes(b"")  # a damaged copy of the same dataset is rebuilt without --overwrite
    prepare_data(source, out, vocab_size=290)
    TokenDataset(out).verify()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_data(source, tmp_path / "foreign", vocab_size=280)


def test_concurrent_prepares_of_one_folder_both_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    source = write_txt_corpus(tmp_path / "c", make_docs(8))
    with ThreadPoolExecutor(2) as pool:  # flock also serialises two threads: each opens the lock file itself
        paths = list(pool.map(lambda _: prepare_data(source, tmp_path / "ds", vocab_size=280), range(2)))
    assert paths[0] == paths[1]
    TokenDataset(paths[0]).verify()
    assert not list(paths[0].glob("*.tmp"))


# --- sampling ----------------------------------------------------------------------------------------------------

def test_sample_batch_reads_shifted_windows_deterministically():
    tokens = np.arange(5000, dtype=np.uint32)
    x, y = sample_batch(tokens, 8, 32, seed=1, step=7)
    assert x.dtype == torch.long and x.shape == y.shape == (8, 32)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows, next-token targets
    assert int(y.max()) < len(tokens)
    again = sample_batch(tokens, 8, 32, seed=1, step=7)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, sample_batch(tokens, 8, 32, seed=1, step=8)[0])
    assert not torch.equal(x, sample_batch(tokens, 8, 32, seed=2, step=7)[0])
    with pytest.raises(DataError, match="too few"):
        sample_batch(tokens[:32], 1, 32, seed=0, step=0)


def test_sample_batch_resume_and_rank_decomposition():
    tokens = np.arange(100_000, dtype=np.uint32)
    run = [sample_batch(tokens, 8, 16, seed=0, step=s)[0] for s in range(6)]
    assert torch.equal(run[4], sample_batch(tokens, 8, 16, seed=0, step=4)[0])  # resuming at step 4
    for world in (2, 4, 8):
        parts = [sample_batch(tokens, 8 // world, 16, seed=0, step=3, rank=r, world_size=world)[0]
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), run[3])
    starts = torch.cat(run)[:, 0].float()  # offsets cover the split: mean near the middle, no repeats
    assert abs(starts.mean().item() / len(tokens) - 0.5) < 0.15 and len(set(starts.tolist())) == len(starts)


def test_eval_batches_cover_fixed_windows_across_ranks():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(eval_batches(tokens, 3, 100))
    xs = torch.cat([x for x, _ in batches])
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    assert xs[:, 0].tolist() == list(range(0, 1000, 100)) and torch.equal(torch.cat([y for _, y in batches]), xs + 1)
    ranked = [x for r in range(3) for x, _ in eval_batches(tokens, 2, 100, rank=r, world_size=3)]
    assert sorted(torch.cat(ranked)[:, 0].tolist()) == xs[:, 0].tolist()
    assert torch.cat([x for x, _ in eval_batches(tokens, 3, 100, max_batches=2)])[:, 0].tolist() == list(
        range(0, 600, 100))


# --- calibration -------------------------------------------------------------------------------------------------

def test_calibration_sample_is_seeded_disjoint_and_recorded(small_dataset):
    path, docs = small_dataset
    tok = TokenDataset(path).tokenizer()
    text = "\n".join(docs * 3)
    ids, prov = calibration_sample(tok, text, num_samples=6, seq_len=40, seed=5)
    stream = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = {tuple(stream[i:i + 40]): i for i in range(0, len(stream) - 39, 40)}
    starts = [windows[tuple(row)] for row in ids.tolist()]  # every row is one of the disjoint windows
    assert len(set(starts)) == 6 and ids.dtype == torch.long and ids.shape == (6, 40)
    assert prov == {"source": f"text ({len(text):,} characters)", "seed": 5, "num_samples": 6, "seq_len": 40,
                    "token_sha256": token_sha256(ids), "text_sha256": prov["text_sha256"],
                    "tokens_available": len(stream), "documents": ["text"]}  # which documents the text came from
    again, prov2 = calibration_sample(tok, text, num_samples=6, seq_len=40, seed=5)
    assert torch.equal(ids, again) and prov2 == prov
    fewer, _ = calibration_sample(tok, text, num_samples=3, seq_len=40, seed=5)
    assert torch.equal(fewer, ids[:3])  # a smaller sample is a prefix
    other, prov3 = calibration_sample(tok, text, num_samples=6, seq_len=40, seed=6)
    assert not torch.equal(other, ids) and prov3["token_sha256"] != prov["token_sha256"]
    with pytest.raises(DataError, match="requested"):
        calibration_sample(tok, text, num_samples=len(stream), seq_len=40)


def test_calibration_from_a_dataset_folder_uses_its_validation_documents(small_dataset, tmp_path):
    path, _ = small_dataset
    ds = TokenDataset(path)
    ids, prov = calibration_sample(ds.tokenizer(), path, num_samples=4, seq_len=16)
    val = ds.split("val").tolist()
    for row in ids.tolist():
        assert any(val[i:i + 16] == row for i in range(0, len(val) - 15, 16))
    assert "validation split" in prov["source"]
    with pytest.raises(DataError, match="does not exist"):
        calibration_sample(ds.tokenizer(), str(tmp_path / "held_out.txt"))


@pytest.mark.slow
def test_bundled_corpus_default_dataset_and_default_calibration(tmp_path, monkeypatch):
    """The one test on the real corpus: plain text, the pinned held-out plays, the cache, default calibration."""
    plays = {d.name: d.text for d in shakespeare_corpus().documents()}
    assert len(plays) >= 36 and "hamlet" in plays and "HAMLET:\n" in plays["hamlet"]
    assert not any(c in text for text in plays.values() for c in "*_\\#")
    names = list(plays)
    assert tuple(n for n, v in zip(names, split_documents(len(names), 0.05, 0)) if v) == HELDOUT_PLAYS
    monkeypatch.setenv("DEPTHLAB_CACHE", str(tmp_path))
    path = default_dataset(vocab_size=300)
    assert path.parent.parent == tmp_path
    ds = TokenDataset(path)
    assert [d.name for d in ds.val_documents()] == list(HELDOUT_PLAYS)
    start = time.perf_counter()
    assert default_dataset(vocab_size=300) == path
    assert time.perf_counter() - start < 10  # a no-op: reads the corpus, tokenizes nothing
    ids, prov = calibration_sample(ds.tokenizer(), num_samples=8, seq_len=64)
    val = ds.split("val")  # the default sample is held-out text: windows of exactly the validation shard
    windows = {tuple(w) for w in val[:len(val) // 64 * 64].reshape(-1, 64).tolist()}
    assert all(tuple(row) in windows for row in ids.tolist())
    assert prov["source"] == "shakespeare:" + ",".join(HELDOUT_PLAYS)
