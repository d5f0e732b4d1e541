"""`depthlab compare RUN_A RUN_B`: two runs side by side (config difference, losses, variance, analysis)."""

from __future__ import annotations

from pathlib import Path

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("compare", help=help_, description=f"{help_}. RUN_A and RUN_B are run folders (of "
                       "'depthlab train' or a study's runs/NAME).")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the comparison as Markdown")
    common.add_json(p, "the comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.fileio import atomic_write_text
    from depthlab.study.compare import compare_runs, format_comparison

    comparison = compare_runs(args.run_a, args.run_b)
    if args.markdown:
        atomic_write_text(Path(args.markdown), format_comparison(comparison, markdown=True))
    if common.emit_json(args, comparison):
        return 0
    print(format_comparison(comparison), end="")
    if args.markdown:
        print(f"wrote {args.markdown}")
    return 0
