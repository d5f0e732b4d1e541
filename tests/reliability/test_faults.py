"""Faults through the command line: a really full disk during a save, damaged checkpoints, a non-finite loss.

Each ends in one line on stderr and exit code 2, with every complete checkpoint intact and nothing lost: after the
fault is removed, `--resume` finishes the run bitwise as if nothing had happened.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthlab import checkpoint as ckpt
from depthlab.cli import main
from depthlab.train.trainer import train
from tests.conftest import tiny_config
from tests.reliability.conftest import write_config
from tests.reliability.test_crash_resume import records, without_timing


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MB tmpfs: room for the first checkpoint of the tiny run (0.65 MB) but not the second. Needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)],
                      check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_during_save_then_resume_loses_nothing(tiny_dataset, tmp_path, small_disk, capsys):
    cfg = tiny_config(tiny_dataset)
    config_file = write_config(cfg, tmp_path / "cfg.yaml")
    train(cfg, tmp_path / "reference")
    run = small_disk / "run"
    assert main(["train", str(config_file), "--out", str(run)]) == 2
    err = one_line_error(capsys)
    assert "could not save checkpoint step 8" in err and "intact" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000004"]  # no .tmp left on the full disk
    ckpt.verify(run / "checkpoints" / "step_000004")

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # the user frees space
    capsys.readouterr()
    assert main(["train", str(config_file), "--out", str(run), "--resume"]) == 0
    a = load_file(tmp_path / "reference" / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    b = load_file(run / "checkpoints" / "step_000012" / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for log in ("metrics.jsonl", "layer_stats.jsonl"):
        assert without_timing(records(run / log)) == without_timing(records(tmp_path / "reference" / log))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = [
    ("flip one bit of the weights", lambda c: flip(c / ckpt.MODEL_FILE), "does not match its recorded checksum"),
    ("truncate the weights", lambda c: truncate(c / ckpt.MODEL_FILE), "does not match its recorded checksum"),
    ("flip one bit of the trainer state", lambda c: flip(c / ckpt.STATE_FILE), "does not match"),
    ("truncate the trainer state", lambda c: truncate(c / ckpt.STATE_FILE), "does not match"),
    ("delete the trainer state", lambda c: (c / ckpt.STATE_FILE).unlink(), "is incomplete"),
    ("truncate meta.json", lambda c: truncate(c / ckpt.META_FILE), "unreadable meta.json"),
    ("empty meta.json", lambda c: (c / ckpt.META_FILE).write_text(""), "unreadable meta.json"),
    ("binary meta.json", lambda c: (c / ckpt.META_FILE).write_bytes(b"\xff\x00\xfe"), "unreadable meta.json"),
    ("meta.json of another format", lambda c: (c / ckpt.META_FILE).write_text('{"format": "x"}'), "unknown format"),
    ("meta.json without checksums", lambda c: (c / ckpt.META_FILE).write_text(
        '{"format": "depthlab-checkpoint-v1", "step": 4}'), "does not list the checksums"),
    ("meta.json with an empty checksum list", lambda c: (c / ckpt.META_FILE).write_text(
        '{"format": "depthlab-checkpoint-v1", "step": 4, "sha256": {}}'), "does not list the checksums"),
    ("meta.json that is a list", lambda c: (c / ckpt.META_FILE).write_text("[1]"), "unknown format 'list'"),
]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=4", "--trainer.eval_interval=0")
    write_config(cfg, root / "cfg.yaml")
    train(cfg, root / "run")
    return root


@pytest.mark.parametrize("damage, message", [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_refused_by_every_command(damage, message, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    damage(ckpt.list_checkpoints(run / "checkpoints")[-1])
    for argv in (["train", str(finished_run / "cfg.yaml"), "--out", str(run), "--resume"],
                 ["sample", str(run), "--max-new-tokens", "2"],
                 ["export", str(run), "--out", str(tmp_path / "hf")]):
        assert main(argv) == 2, argv
        assert message in one_line_error(capsys), argv
    assert not (tmp_path / "hf").exists()


def test_non_finite_loss_via_the_command_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(finished_run / "cfg.yaml"), "--out", str(run), "--optimizer.lr=1e38",
                 "--optimizer.grad_clip=0", "--trainer.max_steps=12", "--trainer.save_interval=1"]) == 2
    err = one_line_error(capsys)
    assert "non-finite loss or gradient at step" in err and "last good checkpoint" in err
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        ckpt.verify(path)
        assert all(torch.isfinite(t).all() for t in load_file(path / ckpt.MODEL_FILE).values())


def test_an_existing_file_can_be_replaced_by_a_file_output(tmp_path):
    """Rerunning `doctor --json d.json` replaces d.json; only a folder output refuses an existing file."""
    from depthlab.errors import FileSystemError
    from depthlab.fileio import check_out

    f = tmp_path / "d.json"
    f.write_text("{}")
    assert check_out(f, "--json", folder=False) == f
    with pytest.raises(FileSystemError, match="is a file, not a folder"):
        check_out(f, "--out")
    with pytest.raises(FileSystemError, match="is a file, not a folder"):
        check_out(f / "x.json", "--json", folder=False)
