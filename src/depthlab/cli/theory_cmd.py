"""`depthlab theory`: Monte-Carlo variance propagation with sparse sub-layers vs closed forms (SPEC §7)."""

from __future__ import annotations

import argparse

from depthlab.cli import common
from depthlab.errors import ConfigError

# depthlab.theory's MASKS and NORMS, spelled out so that building the parser does not import torch.
MASKS = ("iid", "magnitude", "attention", "routing", "gqa")
NORMS = ("pre", "lns", "post")


def _densities(text: str) -> list[float]:
    try:
        return [float(_number(part)) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        message = f"expected comma-separated numbers like 1,0.5,1/8, got '{text}'"
        raise argparse.ArgumentTypeError(message) from None


def _number(text: str) -> float:
    """'0.25' or '1/4' → 0.25."""
    num, slash, den = text.strip().partition("/")
    return float(num) / float(den) if slash else float(num)


def register(sub, help_: str) -> None:
    p = sub.add_parser("theory", help=help_, description=(
        "Simulate Var(x_l) and the Jacobian distance ||dx_{l+1}/dx_l - I||_F through a random residual "
        "stack whose sub-layers are sparse, and compare with the closed forms (SPEC §7). Writes results.json "
        "and PNG figures."))
    p.add_argument("--mask", default="iid", choices=[*MASKS, "all"], help="sparsity mechanism (default iid)")
    p.add_argument("--densities", type=_densities, default=[1, 0.5, 0.25, 0.125, 0.0625, 0.03125],
                   help="comma-separated densities p in (0, 1] (default 1,0.5,...,1/32)")
    p.add_argument("--layers", type=int, default=64, help="blocks L (default 64)")
    p.add_argument("--d-model", type=int, default=512, help="width d (default 512)")
    p.add_argument("--norm", default="all", choices=[*NORMS, "all"],
                   help="norm placement: pre, lns (1/sqrt(l+1)), post, or all (default)")
    p.add_argument("--seeds", type=int, default=3, help="independent networks per density (default 3)")
    common.add_seed(p, "random seed")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--sigma-w", type=float, default=0.02, help="branch weight std σ_w (default 0.02)")
    p.add_argument("--sigma0", type=float, default=0.02, help="embedding std σ_0 (default 0.02)")
    p.add_argument("--experts", type=int, default=64, help="routing: experts E, p = k/E (default 64)")
    p.add_argument("--heads", type=int, default=32, help="gqa: query heads, p = n_kv/n_heads (default 32)")
    p.add_argument("--support", type=float, default=8.0, help="gqa: attention support 1/Σa² (default 8)")
    p.add_argument("--jacobian", default="auto", choices=["auto", "exact", "estimate"],
                   help="exact (d probes) or Rademacher estimate; auto = exact when d <= 64")
    p.add_argument("--probes", type=int, default=2, help="Rademacher probes per block (default 2)")
    common.add_out(p, "output folder", default="theory_out")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from depthlab.theory import simulate

    if not args.densities:
        raise ConfigError("--densities is empty")
    result = simulate(args.mask, densities=args.densities, layers=args.layers, d_model=args.d_model,
                      norm=args.norm, seeds=args.seeds, seed=args.seed, tokens=args.tokens,
                      sigma_w=args.sigma_w, sigma0=args.sigma0, experts=args.experts, heads=args.heads,
                      support=args.support, jacobian=args.jacobian, probes=args.probes)
    paths = result.save(args.out)
    for run_ in result.runs:
        print(f"{run_.mask}/{run_.norm}: {run_.seconds:.1f} s ({run_.cpu_seconds:.1f} s CPU over "
              f"{torch.get_num_threads()} threads) for {args.layers} layers × d={args.d_model} × "
              f"{len(args.densities)} densities × {args.seeds} seeds")
    print(f"total {result.seconds:.1f} s\n")
    for line in result.conclusions:
        print(f"- {line}")
    print(f"\nwrote {len(paths)} files to {args.out}: {', '.join(p.rsplit('/', 1)[-1] for p in paths)}")
    return 0
