"""`depthlab data prepare|info`: summaries on success; one line and exit code 2 on bad input, nothing overwritten."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from depthlab.cli import main
from depthlab.data import TokenDataset

DOCS = [f"Document {i}: " + " ".join(["the king", "of all", "the land", "o my lord"][j % 4] for j in range(i, i + 80))
        for i in range(8)]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(DOCS):
        (folder / f"{i}.txt").write_text(text + "\n")
    return folder


def prepare(*args) -> int:
    return main(["data", "prepare", *map(str, args)])


def one_line_error(capsys, contains: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("depthlab data: error: ") and contains in err, err
    assert "Traceback" not in err


def test_prepare_prints_a_summary_and_info_describes_the_folder(corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    assert prepare("--source", corpus, "--out", out, "--vocab-size", 280, "--val-fraction", 0.25, "--seed", 2) == 0
    printed = capsys.readouterr().out
    meta = TokenDataset(out).meta
    assert f"dataset   {out}" in printed and f"source    {corpus.resolve()}" in printed
    assert f"{meta['splits']['train']['tokens']:,} tokens" in printed and "6 documents" in printed
    assert main(["data", "info", str(out), "--verify"]) == 0
    info = capsys.readouterr().out
    assert "2 documents" in info and "seed 2" in info and "shards verified" in info


def test_data_without_an_action_shows_usage(capsys):
    assert main(["data"]) == 2
    assert "usage: depthlab data" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing corpus", "empty corpus", "unreadable file", "missing tokenizer",
                                  "vocab too small", "not a dataset", "no output folder"])
def test_bad_input_is_one_line_and_exit_2(case, corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x80\x81\x82 not text")
    args, message = {
        "missing corpus": (["--source", tmp_path / "nope"], "not found"),
        "empty corpus": (["--source", tmp_path / "empty"], "is empty"),
        "unreadable file": (["--source", tmp_path / "binary.txt"], "cannot read"),
        "missing tokenizer": (["--source", corpus, "--tokenizer", tmp_path / "tok" / "tokenizer.json"],
                              "does not exist"),
        "vocab too small": (["--source", corpus, "--vocab-size", 100], "too small"),
        "not a dataset": (["--source", corpus, "--out", tmp_path / "empty"], "not a prepared dataset"),
        "no output folder": (["--source", corpus], "output folder is required"),
    }[case]
    if "--out" not in args and case != "no output folder":
        args += ["--out", tmp_path / "out"]
    assert prepare(*args) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "empty") == ["blank.txt"]


def test_a_folder_holding_another_dataset_is_left_untouched(corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    assert prepare("--source", corpus, "--out", out, "--vocab-size", 280) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare("--source", corpus, "--out", out, "--vocab-size", 300) == 2
    one_line_error(capsys, "already holds a different dataset")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert prepare("--source", corpus, "--out", out, "--vocab-size", 300, "--overwrite") == 0
    assert TokenDataset(out).meta["settings"]["tokenizer"]["vocab_size"] == 300


def test_info_on_a_missing_folder_fails_cleanly_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "depthlab", "data", "info", str(tmp_path / "nowhere")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
