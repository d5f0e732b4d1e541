"""Training throughput: depthlab's Transformer vs Hugging Face LlamaForCausalLM, same shape, same batches, one run.

For each shape, both models train (forward + backward + AdamW step) on identical token batches, interleaved
repeat by repeat after a warm-up, so machine load affects both alike. Reports tokens/s, the ratio, and model-FLOPs
utilisation (6·N_matmul + 12·L·d·T FLOPs per token, see depthlab.model.params) against the measured matmul peak of the
dtype used.

    python benchmarks/train_throughput.py                 # CPU shapes, writes a Markdown table to stdout
    python benchmarks/train_throughput.py --device cuda --shapes gpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from depthlab.config import ModelConfig, OptimizerConfig
from depthlab.model.hf import to_hf
from depthlab.model.params import param_counts
from depthlab.model.transformer import Transformer
from depthlab.precision import resolve_dtype
from depthlab.train.optim import build_optimizer

SHAPES = {
    "cpu": [  # (name, d, L, heads, T, batch)
        ("tiny d128 L4 T128", 128, 4, 4, 128, 32),
        ("d512 L8 T512", 512, 8, 8, 512, 4),
        ("d1024 L16 T512", 1024, 16, 16, 512, 1),
    ],
    "gpu": [
        ("d512 L8 T512", 512, 8, 8, 512, 32),
        ("d1024 L16 T512", 1024, 16, 16, 512, 16),
        ("d2048 L16 T1024", 2048, 16, 16, 1024, 8),
    ],
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=1024, repeats=3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_fn(model, optimizer, batch, device, dtype, hf: bool):
    x, y = batch
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if hf:
            logits = model(input_ids=x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        else:
            loss = model(x, y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_shape(name, d, L, heads, T, batch, device, dtype, repeats) -> dict:
    cfg = ModelConfig(vocab_size=32000, d_model=d, n_layers=L, n_heads=heads, seq_len=T)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf = to_hf(ours).to(device)
    hf.config._attn_implementation = "sdpa"
    ours = ours.to(device)
    opts = {"ours": build_optimizer(ours, OptimizerConfig()), "hf": build_optimizer(hf, OptimizerConfig())}
    batches = [(torch.randint(0, 32000, (batch, T), device=device),) * 2 for _ in range(repeats + 1)]
    times = {"ours": [], "hf": []}
    for i, b in enumerate(batches):
        for key, model in (("ours", ours), ("hf", hf)):
            sync(device)
            t = time.perf_counter()
            step_fn(model, opts[key], b, device, dtype, hf=key == "hf")
            sync(device)
            if i:  # the first step of each is warm-up
                times[key].append(time.perf_counter() - t)
    tokens = batch * T
    flops = param_counts(cfg).flops_per_token * tokens
    result = {"shape": name, "tokens_per_step": tokens}
    for key, samples in times.items():
        med = statistics.median(samples)
        result[f"{key}_tok_s"] = tokens / med
        result[f"{key}_flops"] = flops / med
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", choices=list(SHAPES), default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shapes = SHAPES[args.shapes or ("gpu" if device.type == "cuda" else "cpu")]
    peaks = {str(dt).removeprefix("torch."): matmul_peak(device, dt) / 1e9 for dt in (torch.float32, torch.bfloat16)}
    peak = peaks[str(dtype).removeprefix("torch.")] * 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    print("measured matmul peak (1024³): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"training dtype: {str(dtype).removeprefix('torch.')}\n")
    print("| shape | tokens/step | depthlab tok/s | HF Llama tok/s | ratio | depthlab MFU | HF MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        r = bench_shape(*shape, device, dtype, args.repeats)
        print(f"| {r['shape']} | {r['tokens_per_step']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | "
              f"{r['ours_tok_s'] / r['hf_tok_s']:.2f}x | {100 * r['ours_flops'] / peak:.1f}% | "
              f"{100 * r['hf_flops'] / peak:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
