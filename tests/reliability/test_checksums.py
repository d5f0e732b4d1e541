"""tokenizer.json is checksummed like the checkpoint files: recorded when a run, an export or a dataset is written,
compared when it is loaded. One flipped byte is a one-line error naming the file (exit 2 through the CLI); folders
written before the checksum was recorded still load."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from depthlab.cli import main
from depthlab.data import TokenDataset
from depthlab.errors import DataError, ModelLoadError
from depthlab.fileio import checksum_path, file_sha256, verify_checksum
from depthlab.loading import load_model
from tests.reliability.test_faults import one_line_error


def flip_byte(path: Path) -> None:
    """Change one letter inside the file (the JSON still parses: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    i = data.index(b'"vocab"') + 12
    while not chr(data[i]).isalpha():
        i += 1
    data[i] ^= 0x20  # swap the letter's case
    path.write_bytes(bytes(data))
    json.loads(data)


def test_sidecar_is_sha256sum_format(workspace):
    tok = workspace / "run" / "tokenizer.json"
    digest, name = checksum_path(tok).read_text().split()
    assert (digest, name) == (file_sha256(tok), "tokenizer.json")
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", checksum_path(tok).name], cwd=tok.parent,
                              check=False).returncode == 0


@pytest.mark.parametrize("command", [["sample", "{m}", "--max-new-tokens", "2"], ["export", "{m}", "--out", "{o}"]])
def test_flipped_byte_in_a_run_tokenizer_is_refused(command, workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    flip_byte(run / "tokenizer.json")
    argv = [a.replace("{m}", str(run)).replace("{o}", str(tmp_path / "hf")) for a in command]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"{run / 'tokenizer.json'} is corrupt" in err and "tokenizer.json.sha256" in err, err
    assert not (tmp_path / "hf").exists()


def test_flipped_byte_in_an_export_is_refused(workspace, tmp_path, capsys):
    assert main(["export", str(workspace / "run"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    tok = tmp_path / "hf" / "tokenizer.json"
    verify_checksum(tok, ModelLoadError)  # recorded by the export
    flip_byte(tok)
    assert main(["sample", str(tmp_path / "hf"), "--max-new-tokens", "2"]) == 2
    assert f"{tok} is corrupt" in one_line_error(capsys)


def test_a_torn_sidecar_is_one_line(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    checksum_path(run / "tokenizer.json").write_text("deadbeef")
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 2
    assert "tokenizer.json.sha256 is corrupt" in one_line_error(capsys)


def test_folders_without_the_sidecar_still_load(workspace, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    checksum_path(run / "tokenizer.json").unlink()
    _, tokenizer = load_model(run)
    assert tokenizer.encode("to be")


def test_dataset_tokenizer_checksum(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"]["file_sha256"] == file_sha256(data / "tokenizer.json")
    flip_byte(data / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer.json is corrupt"):
        TokenDataset(data).tokenizer()
    with pytest.raises(DataError, match="tokenizer.json is corrupt"):  # data info --verify
        TokenDataset(data).verify()
    del meta["tokenizer"]["file_sha256"]  # a dataset prepared before the checksum was recorded
    (data / "meta.json").write_text(json.dumps(meta))
    assert TokenDataset(data).tokenizer().encode("to be")
