"""`depthlab doctor MODEL`: a quick diagnosis of depth use, variance growth, sparsity and missing recipe levers."""

from __future__ import annotations

import argparse

from depthlab.tools.doctor import doctor


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "doctor", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nMODEL is a depthlab run or checkpoint folder, a Hugging Face folder or hub id, a "
        ".gguf file, or 'smollm2'. Runs variance, angular distance, usefulness, a Jacobian estimate, attention and "
        "weight sparsity on a small seeded held-out sample (default 8x128 tokens: a few minutes for SmolLM2 on 2 CPU "
        "cores). Use more tokens than the model's width + 1, or every usefulness fit is exact.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--num-samples", type=int, default=8, help="calibration sequences N (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence T (default 128)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--data", default=None, help="calibration text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    p.add_argument("--tau", type=float, default=0.10, help="usefulness threshold: useful when loss ratio > 1+tau")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype (auto: fp32 on CPUs without fast bf16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the diagnosis as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    result = doctor(args.model, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, data=args.data,
                    tau=args.tau, dtype=args.dtype, device=args.device, json_out=args.json_out,
                    progress=not args.no_progress)
    print(result.render())
    if args.json_out:
        print(f"diagnosis: {args.json_out}")
    return 0
