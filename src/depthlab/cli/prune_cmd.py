"""`depthlab prune MODEL --drop auto|LIST --out DIR`: remove blocks, save the smaller model, compare before/after."""

from __future__ import annotations

import argparse

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "prune", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\n--drop auto chooses N blocks on a seeded held-out calibration sample "
        "(usefulness: lowest loss ratio under linear replacement; angular: Gromov et al.'s closest N-block window); "
        "--drop 3,5-7 names them. The pruned model is saved as a standard Hugging Face folder (a depthlab run "
        "folder for depthlab models without a standard architecture), with perplexity on further held-out windows "
        "and optional zero-shot accuracy before and after, in DIR/prune_report.json.\n\n--unit attn|mlp removes only "
        "the attention or MLP/MoE sub-layer of the chosen blocks (--drop auto: those whose removal raises the loss "
        "least) by zeroing its weights, so the saved model is a standard one that plain transformers loads; it is "
        "no smaller and no faster.")
    common.add_model(p)
    p.add_argument("--drop", required=True, metavar="auto|LIST", help="'auto' or block indices like 3,5-7")
    p.add_argument("--unit", choices=("block", "attn", "mlp"), default="block",
                   help="what to remove from each chosen block (default: the whole block)")
    p.add_argument("--n", type=common.Number(int, 1), default=None, help="blocks to drop with --drop auto (default: a quarter)")
    p.add_argument("--method", choices=("usefulness", "angular"), default="usefulness",
                   help="how --drop auto chooses (default usefulness)")
    p.add_argument("--eval", dest="tasks", default=None, metavar="TASKS",
                   help="also compare zero-shot accuracy on these tasks (comma list)")
    p.add_argument("--limit", type=common.Number(int, 1), default=None, help="examples per task (default: all)")
    p.add_argument("--num-samples", type=common.Number(int, 1), default=8, help="calibration sequences for --drop auto (default 8)")
    p.add_argument("--eval-samples", type=common.Number(int, 1), default=8, help="held-out sequences for perplexity (default 8)")
    p.add_argument("--seq-len", type=common.Number(int, 2), default=128, help="tokens per sequence (default 128)")
    common.add_seed(p)
    p.add_argument("--data", default=None, help="held-out text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    common.add_dtype(p)
    common.add_device(p)
    common.add_out(p, "folder for the pruned model and prune_report.json (new or empty)", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out atomically (never the "
                   "model's own folder, a folder holding it, the home or current folder)")
    common.add_json(p, "the report")
    common.add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.tools.prune import format_report, prune_model

    report = prune_model(args.model, args.drop, args.out, n=args.n, method=args.method, tasks=args.tasks,
                         limit=args.limit, num_samples=args.num_samples, seq_len=args.seq_len,
                         eval_samples=args.eval_samples, seed=args.seed, data=args.data, dtype=args.dtype,
                         device=args.device, progress=not args.quiet, overwrite=args.overwrite, unit=args.unit)
    if common.emit_json(args, report):
        return 0
    print(format_report(report))
    return 0
