"""MoE layer throughput vs a dense SwiGLU with the same active FLOPs (dense hidden = k·H_e).

Times forward + backward of one FFN branch (router, grouping, experts, un-grouping, aux losses for the MoE) on a
[tokens, d] input, interleaving MoE and dense runs so background load hits both alike, and reports the median over
repeats. Usage:

    python benchmarks/moe_speed.py                       # d=256, E=8/k=2 and E=64/k=8, bf16 autocast and fp32
    python benchmarks/moe_speed.py --tokens 2048 --repeats 5 --dtype bf16

Prints a Markdown table (the one in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from depthlab.config import ModelConfig, MoEConfig
from depthlab.model.moe import MoE
from depthlab.model.transformer import SwiGLU

# (E, k, H_e): the two shapes of the issue, with the dense equivalent hidden k·H_e = 512 in both.
SHAPES = ((8, 2, 256), (64, 8, 64))


def step_time(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: str, iters: int) -> float:
    """Seconds per forward + backward, averaged over `iters` calls."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    start = time.perf_counter()
    for _ in range(iters):
        with autocast:
            y = module(x)
        y.float().backward(grad)
    return (time.perf_counter() - start) / iters


def compare(d: int, E: int, k: int, hidden: int, tokens: int, dtype: str, repeats: int, iters: int) -> dict:
    torch.manual_seed(0)
    moe = MoE(ModelConfig(d_model=d, n_layers=1, n_heads=1, moe=MoEConfig(num_experts=E, top_k=k,
                                                                          expert_hidden=hidden)))
    dense = SwiGLU(d, k * hidden)
    x = torch.randn(1, tokens, d, requires_grad=True)
    grad = torch.randn(1, tokens, d)
    for module in (moe, dense):  # warm-up: allocator, oneDNN primitive caches
        step_time(module, x, grad, dtype, 2)
    times = {"moe": [], "dense": []}
    for _ in range(repeats):
        times["moe"].append(step_time(moe, x, grad, dtype, iters))
        times["dense"].append(step_time(dense, x, grad, dtype, iters))
    moe_s, dense_s = statistics.median(times["moe"]), statistics.median(times["dense"])
    return {"E": E, "k": k, "H_e": hidden, "dtype": dtype, "moe_tok_s": tokens / moe_s,
            "dense_tok_s": tokens / dense_s, "ratio": dense_s / moe_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    dtypes = ("bf16", "fp32") if args.dtype == "both" else (args.dtype,)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.d}, {args.tokens} tokens, "
          f"median of {args.repeats}×{args.iters} fwd+bwd\n")
    print("| E | k | H_e | dense hidden | dtype | MoE tok/s | dense tok/s | MoE/dense |")
    print("|---|---|-----|--------------|-------|-----------|-------------|-----------|")
    for dtype in dtypes:
        for E, k, hidden in SHAPES:
            r = compare(args.d, E, k, hidden, args.tokens, dtype, args.repeats, args.iters)
            print(f"| {E} | {k} | {hidden} | {k * hidden} | {dtype} | {r['moe_tok_s']:,.0f} | "
                  f"{r['dense_tok_s']:,.0f} | {r['ratio']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
