"""`depthlab prune MODEL --drop auto|LIST --out DIR`: remove blocks, save the smaller model, compare before/after."""

from __future__ import annotations

import argparse

from depthlab.tools.prune import format_report, prune_model


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "prune", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nMODEL is a depthlab run or checkpoint folder, a Hugging Face folder or hub id, a "
        ".gguf file, or 'smollm2'. --drop auto chooses N blocks on a seeded held-out calibration sample "
        "(usefulness: lowest loss ratio under linear replacement; angular: Gromov et al.'s closest N-block window); "
        "--drop 3,5-7 names them. The pruned model is saved as a standard Hugging Face folder (a depthlab run "
        "folder for depthlab models without a standard architecture), with perplexity on further held-out windows "
        "and optional zero-shot accuracy before and after, in DIR/prune_report.json.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--drop", required=True, metavar="auto|LIST", help="'auto' or block indices like 3,5-7")
    p.add_argument("--n", type=int, default=None, help="blocks to drop with --drop auto (default: a quarter)")
    p.add_argument("--method", choices=("usefulness", "angular"), default="usefulness",
                   help="how --drop auto chooses (default usefulness)")
    p.add_argument("--eval", dest="tasks", default=None, metavar="TASKS",
                   help="also compare zero-shot accuracy on these tasks (comma list)")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--num-samples", type=int, default=8, help="calibration sequences for --drop auto (default 8)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out sequences for perplexity (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--data", default=None, help="held-out text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype (auto: fp32 on CPUs without fast bf16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pruned model and prune_report.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    report = prune_model(args.model, args.drop, args.out, n=args.n, method=args.method, tasks=args.tasks,
                         limit=args.limit, num_samples=args.num_samples, seq_len=args.seq_len,
                         eval_samples=args.eval_samples, seed=args.seed, data=args.data, dtype=args.dtype,
                         device=args.device, progress=not args.no_progress)
    print(format_report(report))
    return 0
