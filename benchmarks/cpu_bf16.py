"""bf16 vs fp32 on this CPU: what `dtype=auto` decides (depthlab.precision.cpu_has_fast_bf16), measured (not a test).

Three workloads, each timed in fp32 and in bf16 alternately (fp32, bf16, fp32, bf16; the best of each), in one
process, with the load average before and after:

- one matmul of an activation block by a SmolLM2 MLP weight (2048×576 @ 576×1536), GFLOP/s;
- a SmolLM2-135M forward pass over 8×128 tokens, the model cast to each dtype (what analysis and eval do);
- a depthlab training step (forward, backward, AdamW) under bf16 autocast, as `trainer.dtype: bf16` does, at the
  `tiny` preset's shape (d 128, L 4, T 128, batch 32) and at d 512, L 8, T 512, batch 8.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_bf16.py

On CPUs without native bf16 (AVX2) bf16 is emulated: expect the bf16 columns to be 5-140x slower there.
"""

from __future__ import annotations

import os
import time

import torch

from depthlab import config as cfgmod
from depthlab import load_model
from depthlab.model.transformer import Transformer
from depthlab.precision import cpu_has_fast_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alternate(make, repeats: int) -> dict[str, float]:
    """Seconds per call of make(dtype)() for fp32 and bf16, alternating twice; the best of each."""
    out: dict[str, float] = {}
    for name in ("fp32", "bf16", "fp32", "bf16"):
        t = best_of(make(DTYPES[name]), repeats)
        out[name] = min(out.get(name, t), t)
    return out


def matmul(dtype):
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    return lambda: a @ b


def smollm2_forward(model, ids):
    def make(dtype):
        model.to(dtype)

        def run():
            with torch.no_grad():
                model(ids)
        return run
    return make


def training_step(overrides: dict, batch: int):
    cfg = cfgmod.load_config("tiny", {"model.vocab_size": 4096, **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (batch, cfg.model.seq_len + 1))

    def make(dtype):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x[:, :-1], targets=x[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


def main() -> None:
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (auto picks bf16): {cpu_has_fast_bf16()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    model, _ = load_model("smollm2", dtype="fp32")
    ids = torch.randint(0, 49152, (8, 128))
    rows = [("matmul 2048×576 @ 576×1536", alternate(matmul, 20), 2 * 2048 * 576 * 1536),
            ("SmolLM2-135M forward, 8×128 tokens", alternate(smollm2_forward(model, ids), 3), None),
            ("training step, tiny preset (d128 L4 T128 b32)", alternate(training_step({"model.n_layers": 4}, 32), 5),
             None),
            ("training step, d512 L8 T512 b8", alternate(training_step(
                {"model.n_layers": 8, "model.d_model": 512, "model.n_heads": 8, "model.seq_len": 512}, 8), 2), None)]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| workload | fp32 | bf16 | bf16 speed-up |")
    print("|---|---|---|---|")
    for name, t, flops in rows:
        cells = [f"{t[d] * 1e3:.1f} ms ({flops / t[d] / 1e9:.0f} GFLOP/s)" if flops else f"{t[d] * 1e3:.0f} ms"
                 for d in ("fp32", "bf16")]
        print(f"| {name} | {cells[0]} | {cells[1]} | {t['fp32'] / t['bf16']:.2f}x |")


if __name__ == "__main__":
    main()
