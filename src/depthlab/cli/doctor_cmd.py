"""`depthlab doctor MODEL`: a quick diagnosis of depth use, variance growth, sparsity and missing recipe levers."""

from __future__ import annotations

import argparse

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "doctor", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nRuns variance, angular distance, usefulness, a Jacobian estimate, attention and "
        "weight sparsity on a small seeded held-out sample (default 8x128 tokens: a few minutes for SmolLM2 on 2 CPU "
        "cores); the usefulness maps are fitted on a separate held-out sample of 32*(d+1) tokens.")
    common.add_model(p)
    p.add_argument("--num-samples", type=common.Number(int, 1), default=8, help="calibration sequences N (default 8)")
    p.add_argument("--seq-len", type=common.Number(int, 2), default=128, help="tokens per sequence T (default 128)")
    common.add_seed(p)
    p.add_argument("--data", default=None, help="calibration text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    p.add_argument("--tau", type=common.Number(float, 0), default=0.10, help="usefulness threshold: useful when loss ratio > 1+tau")
    common.add_dtype(p)
    common.add_device(p)
    common.add_json(p, "the diagnosis")
    common.add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.tools.doctor import doctor

    result = doctor(args.model, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, data=args.data,
                    tau=args.tau, dtype=args.dtype, device=args.device, progress=not args.quiet)
    if common.emit_json(args, result.to_dict()):
        return 0
    print(result.render())
    if args.json:
        print(f"diagnosis: {args.json}")
    return 0
