"""The `depthlab` command line: a thin layer that parses arguments and calls the public API.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a function ``(args) -> int | None``. A DepthlabError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from depthlab import __version__
from depthlab.errors import DepthlabError

# (module, help): the order is the order `depthlab --help` lists them.
COMMANDS = [
    ("demo", "run the embedded default end to end (offline, CPU)"),
    ("data", "prepare token shards from a corpus"),
    ("config", "show presets, config keys and resolved configs"),
    ("train", "train a decoder-only LM with per-layer statistics"),
    ("sample", "generate text from a model"),
    ("export", "export a depthlab run to a standard Hugging Face folder"),
    ("analyze", "measure how well a model uses its depth"),
    ("eval", "perplexity and zero-shot downstream accuracy"),
    ("study", "run depth-scaling sweeps x sparsity knobs"),
    ("report", "render a study folder as HTML + Markdown"),
    ("compare", "compare two runs side by side"),
    ("theory", "simulate variance propagation with sparse sub-layers"),
    ("recipe", "write a training config for a depth-effective model"),
    ("doctor", "diagnose a model's depth use and missing recipe levers"),
    ("prune", "remove blocks from a model and save it"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(2, f"depthlab: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="depthlab", description="Measure and fix the curse of depth in large language models.",
                     epilog="Run 'depthlab COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"depthlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_ in COMMANDS:
        module = importlib.import_module(f"depthlab.cli.{name.replace('-', '_')}_cmd")
        module.register(sub, help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except DepthlabError as e:
        print(f"depthlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"depthlab {args.command}: interrupted (finished work is saved; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: keep it to one line unless debugging
        if os.environ.get("DEPTHLAB_DEBUG"):
            raise
        print(f"depthlab {args.command}: internal error: {type(e).__name__}: {e} "
              "(set DEPTHLAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def not_available(name: str, issue: str):
    """Register a subcommand whose feature has not landed yet: it says so and exits 2."""

    def register(sub, help_: str) -> None:
        p = sub.add_parser(name, help=f"{help_} [not available yet]", description=f"{help_}. Not available yet "
                           f"({issue}).")
        p.set_defaults(func=lambda args: _unavailable(name, issue), accepts_overrides=True)

    return register


def _unavailable(name: str, issue: str) -> int:
    print(f"depthlab {name}: not available yet ({issue})", file=sys.stderr)
    return 2
