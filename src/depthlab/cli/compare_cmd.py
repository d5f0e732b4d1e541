"""`depthlab compare A B [C ...]`: any models side by side on one shared sample, or two run folders' records."""

from __future__ import annotations

import argparse
from pathlib import Path

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "compare", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nEach MODEL is anything 'depthlab analyze' accepts ({common.MODEL_HELP}). The "
        "models are analysed with --metrics on one seeded sample (token ids shared when the tokenizers agree, else "
        "the same text re-tokenised per model) and DIR gets compare.json, compare_layers.csv (one row per model "
        "and block, with relative depth (l+1)/L), overlay plots per metric and, for models that share token ids, "
        "linear CKA between every pair of layers (cka_A_B.png).\n\nTwo run folders (of 'depthlab train' or a "
        "study's runs/NAME) without --metrics are compared by their records instead: config difference, final "
        "losses, per-layer variance, analysis summary.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more models (or two run folders)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics (default angular,lens)")
    p.add_argument("--data", default=None, help="sample text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    p.add_argument("--num-samples", type=common.Number(int, 1), default=8, help="sequences N (default 8)")
    p.add_argument("--seq-len", type=common.Number(int, 2), default=128, help="tokens per sequence T (default 128)")
    common.add_seed(p)
    common.add_dtype(p)
    common.add_device(p)
    p.add_argument("--micro-batch-size", type=common.Number(int, 1), default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--no-cka", action="store_true", help="skip the layer-by-layer linear CKA")
    common.add_out(p, "folder for the model comparison", default="compare")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--markdown", default=None, metavar="FILE", help="run folders: also write the comparison as "
                   "Markdown")
    common.add_json(p, "the comparison")
    common.add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.errors import StudyError
    from depthlab.fileio import atomic_write_text
    from depthlab.rundir import RunDir

    runs = len(args.models) == 2 and all(RunDir(m).config_path.is_file() for m in args.models)
    if runs and args.metrics is None:
        from depthlab.study.compare import compare_runs, format_comparison

        comparison = compare_runs(*args.models)
        if args.markdown:
            atomic_write_text(Path(args.markdown), format_comparison(comparison, markdown=True))
        if common.emit_json(args, comparison):
            return 0
        print(format_comparison(comparison), end="")
        if args.markdown:
            print(f"wrote {args.markdown}")
        return 0
    if len(args.models) < 2:
        raise StudyError("compare needs at least two models")
    if args.markdown:
        raise StudyError("--markdown is for comparing two run folders; model comparisons write --out")
    from depthlab.study.compare import compare_models, format_model_comparison

    comparison = compare_models(args.models, args.out, metrics=args.metrics, data=args.data,
                                num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                                dtype=args.dtype, device=args.device, micro_batch_size=args.micro_batch_size,
                                cka=not args.no_cka, overwrite=args.overwrite, progress=not args.quiet)
    if common.emit_json(args, comparison):
        return 0
    print(format_model_comparison(comparison))
    print(f"results: {args.out}/compare.json, compare_layers.csv, compare_<metric>.png")
    return 0
