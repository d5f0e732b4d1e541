"""Safe file output: atomic files and folders, output paths checked up front, filesystem errors in one line.

Three rules every writer in depthlab follows:

- **Atomic.** A file or folder is written under a unique hidden temporary name beside its target and renamed into
  place when complete, so a reader (or a crash) never sees half of it under its real name. A folder that already
  exists is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` where the OS has it; elsewhere two
  renames leave, at worst, both the old and the new folder intact under hidden names.
- **Nothing is destroyed unasked.** A non-empty output folder is replaced only with ``overwrite``, and even then
  never when it is the filesystem root, the home folder, the current folder (or an ancestor of either), or a folder
  holding the input being read.
- **One line.** Permission, read-only, not-a-folder, name-too-long and disk-full failures become a `FileSystemError`
  naming the path, which the CLI prints as one line.

Files without a manifest of their own (a run's or an exported model's ``tokenizer.json``) get a checksum sidecar
``NAME.sha256`` in ``sha256sum`` format when written (`record_checksum`; ``sha256sum -c`` checks it too), which
readers compare before use (`verify_checksum`), so a flipped byte that still parses is refused instead of silently
changing the tokenization. A file without a sidecar (written before depthlab recorded them) is read unchecked.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from depthlab.errors import DepthlabError, FileSystemError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: temporary files and folders get the permissions a plain open/mkdir would give


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise FileSystemError(os_error_message(e, path)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileSystemError(os_error_message(e, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------------------------------------------
# Checksums


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    """The sidecar that records `path`'s sha256: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def record_checksum(path: str | Path) -> None:
    """Write `path`'s sidecar (one ``sha256sum`` line) atomically, after `path` itself is complete."""
    path = Path(path)
    atomic_write_text(checksum_path(path), f"{file_sha256(path)}  {path.name}\n")


def verify_checksum(path: str | Path, error: type[DepthlabError]) -> None:
    """Raise `error` (one line naming `path`) when `path` does not match its sidecar; no sidecar, no check."""
    path, sidecar = Path(path), checksum_path(path)
    try:
        recorded = sidecar.read_text(encoding="ascii").split()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {sidecar}: {os_error_reason(e)}") from None
    if not recorded or len(recorded[0]) != 64:
        raise error(f"{sidecar} is corrupt: it does not hold a sha256 (write {path.name} again)")
    try:
        actual = file_sha256(path)
    except OSError as e:
        raise error(f"cannot read {path}: {os_error_reason(e)}") from None
    if actual != recorded[0].lower():
        raise error(f"{path} is corrupt: it does not match the sha256 recorded in {sidecar.name}")


# ----------------------------------------------------------------------------------------------------------------
# JSON without NaN literals


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs) -> str:
    """``json.dumps`` that writes non-finite floats as null, so every file depthlab writes is valid JSON."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Output paths


def os_error_message(e: BaseException, path: str | Path) -> str:
    """One line for a failure to write `path`."""
    return f"cannot write {path}: {os_error_reason(e)}"


def os_error_reason(e: BaseException) -> str:
    """What a filesystem failure means, in a few words: the OS's text, and "(disk full)" for a full disk also when a
    library reports it only in its message (SafetensorError, torch's RuntimeError)."""
    text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    if _errno(e) in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror or 'No space left on device'} (disk full)" if isinstance(e, OSError) else \
            f"No space left on device (disk full): {text}"
    return text


def _errno(e: BaseException) -> int | None:
    code = getattr(e, "errno", None)
    if code is None and ("No space left" in str(e) or "StorageFull" in str(e)):
        return errno.ENOSPC
    return code


def check_out(path: str | Path, flag: str = "--out", *, folder: bool = True) -> Path:
    """`path` as an output location that can be created, or a one-line FileSystemError naming it.

    Refused: an empty path, the filesystem root, a dangling symlink, an existing file where a folder is wanted (or a
    folder where a file is), a name longer than the filesystem allows, and a location under a file or a folder that
    is read-only or not writable. Nothing is created.
    """
    if not str(path).strip():
        raise FileSystemError(f"{flag} is empty: name an output {'folder' if folder else 'file'}")
    path = Path(path).expanduser()
    resolved = Path(os.path.realpath(path))
    if resolved == Path(resolved.anchor):
        raise FileSystemError(f"{flag} {path} is the filesystem root: name a folder to write into")
    for part in resolved.parts:
        if len(os.fsencode(part)) > 255:  # NAME_MAX of every common filesystem; longer names fail in stat already
            raise FileSystemError(f"cannot write {path}: file name too long ({len(os.fsencode(part))} bytes, the "
                                  "limit is 255)")
    try:
        if path.is_symlink() and not path.exists():
            raise FileSystemError(f"{flag} {path} is a dangling symbolic link")
        if folder and path.exists() and not path.is_dir():
            raise FileSystemError(f"{flag} {path} is a file, not a folder")
        if not folder and path.is_dir():
            raise FileSystemError(f"{flag} {path} is a folder, not a file")
        existing = resolved.parent if not folder and resolved.exists() else resolved  # a file is replaced there
        while not existing.exists():
            existing = existing.parent
    except OSError as e:
        raise FileSystemError(f"cannot write {path}: {os_error_reason(e)}") from None
    if not existing.is_dir():
        raise FileSystemError(f"cannot write {path}: {existing} is a file, not a folder")
    target = resolved if resolved.exists() else existing
    if not os.access(target, os.W_OK | os.X_OK if target.is_dir() else os.W_OK):
        why = "read-only file system" if _read_only(target) else "permission denied"
        raise FileSystemError(f"cannot write {path}: {target} is not writable ({why})")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_replaceable(out: str | Path, protect: Iterable[str | Path] = (), flag: str = "--out") -> None:
    """Refuse to replace a folder whose loss would destroy what the user did not name: the filesystem root, the home
    folder, the current folder or an ancestor of either, or a folder that is (or holds) a protected input path."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    guarded = [(Path.home(), "the home folder"), (Path.cwd(), "the current folder")]
    for path, what in guarded:
        path = Path(os.path.realpath(path))
        if target == path or target in path.parents:
            raise FileSystemError(f"refusing to replace {flag} {out}: it is {what}" if target == path else
                                  f"refusing to replace {flag} {out}: it holds {what}")
    for p in protect:  # the input: neither it, a folder holding it, nor a part of it
        path = Path(os.path.realpath(Path(p).expanduser()))
        if target == path or target in path.parents or path in target.parents:
            raise FileSystemError(f"refusing to replace {flag} {out}: it is, holds or is inside the input {p}")


def check_folder_target(out: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (),
                        flag: str = "--out") -> Path:
    """The checks of `write_folder`, for callers that want to fail before doing the work: `out` can be created, and
    is new or empty unless `overwrite` allows replacing it (`check_replaceable`)."""
    out = check_out(out, flag)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileSystemError(f"{flag} {out} exists and is not empty: pass --overwrite to replace it, or choose "
                                  "another folder")
        check_replaceable(out, protect, flag)
    return out


def write_folder(out: str | Path, write: Callable[[Path], None], *, overwrite: bool = False,
                 protect: Iterable[str | Path] = (), flag: str = "--out") -> Path:
    """Fill a fresh folder with ``write(tmp)`` and put it at `out` atomically; returns `out`.

    An existing non-empty `out` is replaced only with `overwrite` (and never one that `check_replaceable` guards).
    On any failure the temporary folder is removed and `out` is left as it was.
    """
    out = check_folder_target(out, overwrite=overwrite, protect=protect, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_sibling(out, ".tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise FileSystemError(os_error_message(e, out)) from None
    try:
        write(tmp)
        _fsync_tree(tmp)
        if out.exists():
            _exchange(tmp, out)  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or is_disk_full(e):
            raise FileSystemError(os_error_message(e, out) + f"; {out} is unchanged") from None
        raise
    return out


def unique_sibling(path: Path, suffix: str) -> Path:
    """A hidden name beside `path` that no user folder has and no other process picks: ``.NAME.PID-RANDOM.SUFFIX``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync `path` and give it the mode a plain open() gives under the umask (safetensors writes its file through a
    private 0600 temporary file)."""
    os.chmod(path, 0o666 & ~_UMASK)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2); elsewhere move `b` aside, then `a` into its place."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename2 = libc.renameat2
    except (OSError, AttributeError):
        rename2 = None
    if rename2 is not None:
        at_fdcwd = -100
        if rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(b))
    aside = unique_sibling(b, ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def is_disk_full(e: BaseException) -> bool:
    """A full disk, however the library that hit it reports it (OSError, SafetensorError, torch's RuntimeError)."""
    return _errno(e) in (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError raised anywhere: the path(s) it names and what went wrong."""
    paths = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {os_error_reason(e)}" if paths else os_error_reason(e)
