"""The run folder: the one place that knows its layout, so no other module spells its file names.

Layout::

    RUN/config.yaml            the fully resolved config; a folder holding one is a run
    RUN/tokenizer.json         the tokenizer of the training data
    RUN/tokenizer.json.sha256  its checksum (``sha256sum`` format), checked when the run is loaded
    RUN/metrics.jsonl          loss, learning rate, gradient norm, throughput and validation loss lines
    RUN/layer_stats.jsonl      per-layer statistics lines
    RUN/checkpoints/step_N/    complete checkpoints, oldest first (format and atomicity: `depthlab.checkpoint`)
    RUN/.lock                  present while a process writes RUN

The lock (`folder_lock`, also used for analysis and study-run folders) is an advisory ``flock`` on ``.lock``, which also records the holder (command, pid, host, start time) for
the message a second writer gets. The kernel drops the lock when its holder dies, so a lock left by a killed process
is stale by construction: the next writer takes it without asking. It is not meant for network filesystems whose
``flock`` is not shared between hosts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthlab import checkpoint as ckpt
from depthlab.errors import FileSystemError
from depthlab.fileio import check_out


@dataclass(frozen=True)
class RunDir:
    """A training run folder (it need not exist yet)."""

    path: Path

    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"
    METRICS = "metrics.jsonl"
    LAYER_STATS = "layer_stats.jsonl"
    CHECKPOINTS = "checkpoints"
    LOCK = ".lock"

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run a path belongs to: the path itself, or the run holding it when it is a checkpoint folder."""
        path = Path(path)
        return cls(path.parent.parent if is_checkpoint(path) else path)

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def layer_stats_path(self) -> Path:
        return self.path / self.LAYER_STATS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    def started(self) -> bool:
        """A run was started here (its config is written before the first step)."""
        return self.config_path.exists()

    def is_run(self) -> bool:
        """A run folder that can be loaded: a config and a checkpoints folder."""
        return self.config_path.exists() and self.checkpoints_dir.is_dir()

    def read_config(self) -> dict[str, Any]:
        from depthlab.config import read_yaml

        return read_yaml(self.config_path)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return ckpt.list_checkpoints(self.checkpoints_dir)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def latest_step(self) -> int:
        """The step of the newest complete checkpoint (0 when there is none)."""
        latest = self.latest()
        return ckpt.checkpoint_step(latest) if latest else 0

    def lock(self, command: str) -> contextlib.AbstractContextManager[Path]:
        """Hold the run's lock while writing it: `folder_lock` on the run folder."""
        return folder_lock(self.path, command)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ckpt.META_FILE).exists()


_HELD: dict[Path, int] = {}
"""Folders this process has locked (with a count): taking a held lock again (a study run's trainer) is a no-op."""


@contextlib.contextmanager
def folder_lock(path: str | Path, command: str) -> Iterator[Path]:
    """Hold ``PATH/.lock`` while writing `path` (creating the folder if needed); a second writer is refused in one line.

    A folder that this call created and that is still empty when the lock is released is removed again, so a
    command that stops on a bad input leaves nothing behind. Re-entrant within one process.
    """
    path = check_out(path)
    key = Path(os.path.realpath(path))
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path / RunDir.LOCK, path, command):
            _HELD[key] = 1
            try:
                yield path
            finally:
                del _HELD[key]
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _locked(lock_path: Path, folder: Path, command: str) -> Iterator[None]:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FileSystemError(f"{folder} is in use by {holder}: wait for it to finish or choose another "
                                  "folder") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    try:
        record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # before unlocking: a waiter then re-opens a fresh file
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"'depthlab {info.get('command', '?')}' (pid {info['pid']} on {info.get('host', '?')}, since "
            f"{info.get('started', '?')})")
