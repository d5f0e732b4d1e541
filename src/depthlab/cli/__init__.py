# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for this marker in the entry point's module)
"""The `depthlab` command line: a thin layer that parses arguments and calls the public API.

Each subcommand lives in its own module here and exposes ``register(subparsers, help)``, which adds its parser (with
the shared arguments of `depthlab.cli.common`) and sets ``func`` to a function ``(args) -> int | None``. A
DepthlabError becomes one line on stderr and exit code 2.

Building the parser imports no torch (each command imports what it needs when it runs), so ``depthlab --version``,
``--help`` and shell completion answer at once. Completion uses argcomplete when it is installed:
``eval "$(register-python-argcomplete depthlab)"`` in ~/.bashrc (or ``activate-global-python-argcomplete`` once).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from depthlab import __version__
from depthlab.cli.common import normalize_overrides, resolve_machine
from depthlab.errors import DepthlabError
from depthlab.provenance import CLI_ARGV

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
    ("compare", "compare models (any load_model reference) or two runs side by side"),
    ("theory", "simulate variance propagation with sparse sub-layers"),
    ("recipe", "write a training config for a depth-effective model"),
    ("doctor", "diagnose a model's depth use and missing recipe levers"),
    ("prune", "remove blocks from a model and save it"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="depthlab", description="Measure and fix the curse of depth in large language models.",
                     epilog="Run 'depthlab COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"depthlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_ in COMMANDS:
        module = importlib.import_module(f"depthlab.cli.{name.replace('-', '_')}_cmd")
        module.register(sub, help_)
    return parser


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request (and exit) when argcomplete is installed and the shell is asking."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _complete(parser)
    args, extra = parser.parse_known_args(normalize_overrides(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    CLI_ARGV.set(list(sys.argv[1:] if argv is None else argv))  # the command line results files record
    from depthlab import fileio
    from depthlab.errors import Interrupted
    from depthlab.signals import terminate_as_interrupt

    try:
        resolve_machine(args)
        if getattr(args, "out", None) is not None:  # "", "/", a file, a read-only place: refused before any work
            fileio.check_out(args.out, folder=args.command != "recipe")
        for flag in ("json", "markdown"):  # --json FILE and --markdown FILE likewise
            if getattr(args, flag, None) not in (None, "-"):
                fileio.check_out(getattr(args, flag), f"--{flag}", folder=False)
        with terminate_as_interrupt():
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`| head`) surfaces here, inside the handler, not at interpreter exit
        return code
    except DepthlabError as e:
        print(f"depthlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `depthlab ... | head` closed the pipe: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not raise again
        return 141
    except OSError as e:  # the environment (permissions, read-only, full disk, a path that is not a folder)
        print(f"depthlab {args.command}: error: {fileio.describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
        saved = e.saved if isinstance(e, Interrupted) else "work finished so far is saved"
        again = ["depthlab", *(sys.argv[1:] if argv is None else argv)]
        if getattr(args, "resume", None) is False:
            again.append("--resume")
        print(f"depthlab {args.command}: interrupted: {saved}; resume with: {shlex.join(again)}", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: keep it to one line unless debugging
        if fileio.is_disk_full(e):
            print(f"depthlab {args.command}: error: {fileio.os_error_reason(e)}", file=sys.stderr)
            return 2
        if os.environ.get("DEPTHLAB_DEBUG"):
            raise
        print(f"depthlab {args.command}: internal error: {type(e).__name__}: {e} "
              "(set DEPTHLAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1

