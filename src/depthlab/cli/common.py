"""The arguments every subcommand spells the same way, defined once.

A subcommand adds the ones it needs (``add_model(p)``, ``add_device(p)``, ...); `resolve_machine` then turns the
parsed ``--device``/``--dtype`` into what this machine has, before any command runs, so that ``--device cuda`` on a
CPU-only machine or ``--dtype int8`` is a one-line error (exit 2) that writes nothing. Building these arguments
imports no torch: ``depthlab --help`` and shell completion stay fast.
"""

from __future__ import annotations

import argparse
import sys

from depthlab.precision import DTYPE_NAMES

MODEL_HELP = ("a depthlab run or checkpoint folder, a Hugging Face model folder or hub id, a .gguf file, or "
              "'smollm2' (the bundled SmolLM2-135M-Instruct, a Q4_1 GGUF dequantised to fp32)")


class Number:
    """An argparse type for a numeric option with its valid range declared beside it (a `depthlab.config.Bound`,
    the one definition of a range): an int within int64, or a finite float, within the bound. A value outside is
    refused in one line while parsing, before anything is loaded or written, and the bad-input matrix generates
    its cases from `bound`."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
        from depthlab.config import Bound

        self.kind, self.bound = kind, Bound(lo, hi, lo_open)
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'abc'"

    def __call__(self, text: str):
        import math

        from depthlab.config import INT64_MAX

        value = self.kind(text)  # a ValueError becomes argparse's one line
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if self.kind is int and abs(value) > INT64_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX} in magnitude (int64), got {text}")
        if self.bound.lo is not None or self.bound.hi is not None:
            below = self.bound.lo is not None and (value <= self.bound.lo if self.bound.lo_open
                                                   else value < self.bound.lo)
            if below or self.bound.hi is not None and value > self.bound.hi:
                raise argparse.ArgumentTypeError(f"must be {self.bound.describe()}, got {text}")
        return value


def add_model(p: argparse.ArgumentParser, *, dest: str = "model") -> None:
    p.add_argument(dest, metavar="MODEL", help=MODEL_HELP)


def add_device(p: argparse.ArgumentParser, *, default: str | None = "auto") -> None:
    hint = "default: the config's trainer.device" if default is None else f"default {default}: cuda when present"
    p.add_argument("--device", default=default, metavar="auto|cpu|cuda[:i]", help=f"torch device ({hint})")


def add_placement(p: argparse.ArgumentParser) -> None:
    """Placing a model larger than one device with accelerate (see depthlab.model.dispatch and docs/scale.md)."""
    p.add_argument("--device-map", default=None, metavar="auto|JSON",
                   help="spread the model over GPUs / CPU / disk with accelerate: auto, balanced, sequential, or a "
                   "JSON object {module: device} with devices cpu, disk or a GPU index (replaces --device)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: the most each device may hold, e.g. 0=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where modules placed on disk are memory-mapped from")


def add_dtype(p: argparse.ArgumentParser, *, default: str | None = "auto",
              choices: tuple[str, ...] = DTYPE_NAMES) -> None:
    hint = ("default: the config's trainer.dtype" if default is None else
            f"default {default}: bf16 on GPUs and CPUs with native bf16, else fp32")
    p.add_argument("--dtype", default=default, choices=choices, help=f"compute dtype ({hint})")


def add_out(p: argparse.ArgumentParser, help: str, *, default: str | None = None, required: bool = False,
            metavar: str = "DIR") -> None:
    shown = f" (default {default})" if default else ""
    p.add_argument("--out", default=default, required=required, metavar=metavar, help=help + shown)


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", dest="json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"machine-readable output: {what} as JSON on stdout (instead of the text), or into FILE")


def add_seed(p: argparse.ArgumentParser, what: str = "sampling seed", default: int = 0) -> None:
    p.add_argument("--seed", type=Number(int, 0), default=default, help=f"{what} (default {default})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bars (status lines and the result still print)")


def resolve_machine(args: argparse.Namespace) -> None:
    """``--device auto`` → the device this machine has, ``--dtype auto`` → the dtype that is fast on it (in place).

    A device or dtype this machine cannot use raises a one-line ConfigError before anything is loaded or written.
    """
    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    if device is None and dtype is None:
        return
    from depthlab.precision import dtype_name, resolve_device, resolve_dtype

    resolved = resolve_device(device)
    if device is not None:
        args.device = str(resolved)
    if dtype is not None:
        args.dtype = dtype_name(resolve_dtype(dtype, resolved))


def progress_log(args: argparse.Namespace):
    """Where a command's status lines go: stderr when stdout carries --json, else stdout."""
    if getattr(args, "json", None) == "-":
        return lambda line: print(line, file=sys.stderr)
    return print


def emit_json(args: argparse.Namespace, data: dict) -> bool:
    """Write `data` where ``--json`` asks (stdout for a bare --json); True when stdout took it (skip the text)."""
    if args.json is None:
        return False
    from depthlab.fileio import dumps_json  # NaN/inf → null: the output is valid JSON for any parser

    text = dumps_json(data, indent=1, default=str) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return True
    from pathlib import Path

    from depthlab.fileio import atomic_write_text

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return False


def normalize_overrides(argv: list[str]) -> list[str]:
    """``--model.n_layers 2`` → ``--model.n_layers=2``, so a dotted override's value is never taken for an argument.

    Only options with a dot before any '=' are config overrides (no regular option has one); their value is the next
    word unless that word is itself an option.
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if (arg.startswith("--") and "." in arg and "=" not in arg and i + 1 < len(argv)
                and not argv[i + 1].startswith("--")):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out
