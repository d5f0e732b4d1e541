"""Training throughput: depthlab's Transformer, eager and compiled, vs Hugging Face LlamaForCausalLM, in one run.

For each shape four trainers step (forward + backward + gradient clipping + AdamW, what `depthlab train` does per
step) on identical token batches, interleaved step by step after a warm-up, so machine load affects all alike:

- depthlab eager;
- depthlab under ``torch.compile`` (inductor; C++ on CPU) of the whole model, as ``trainer.compile: true`` does;
- depthlab with each block compiled on its own (``Block.compile()``, torchtitan's per-block compilation: one graph
  for every block, so compile time does not grow with depth), a candidate for the trainer, not used by it: forward
  hooks registered on a block's attention/FFN after it was compiled do not fire, so the per-layer statistics'
  branch values come out zero;
  The first step of a compiled trainer (the compilation) is timed separately and amortised over a ``--run-steps`` run
  (600: the tiny studies' length) in the "600-step" column;
- HF ``LlamaForCausalLM`` built from the same weights (`depthlab.model.hf.to_hf`), eager, SDPA attention.

Each row also measures the per-layer statistics of the trainer (`depthlab.train.stats.LayerStats` hooks, the one
host sync of ``finish``, the layer_stats.jsonl line and the TensorBoard logger with its profile figure) as the extra
time of a statistics step over a plain step of the trainer.compile default (eager), spread over
``--stats-interval`` steps (20: the tiny preset and studies), as a fraction of a plain step; the logger's share is
shown beside it.

MFU counts 6·N_matmul + 12·L·d·T FLOPs per token (`depthlab.model.params`) against the matmul peak of the dtype
measured at the start of the run. The 1-minute load average before and after is printed: a run beside other jobs
is not a measurement, and only the ratios of one run compare.

    python benchmarks/train_throughput.py                 # the tiny study shapes: d128 T128 b32, L = 2, 4, 8, 16
    python benchmarks/train_throughput.py --layers 4 --repeats 3 --threads 1   # one shape, a quick look
    python benchmarks/train_throughput.py --shapes cpu-large
    python benchmarks/train_throughput.py --device cuda --shapes gpu
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from depthlab.config import Config, TrainerConfig, load_config
from depthlab.model.hf import to_hf
from depthlab.model.params import param_counts
from depthlab.model.transformer import Transformer
from depthlab.precision import resolve_dtype
from depthlab.train.loggers import Loggers
from depthlab.train.optim import build_optimizer
from depthlab.train.stats import LayerStats
from depthlab.train.trainer import JsonlLog

SHAPES = {  # (d, L, heads, T, batch); vocab None = the tiny preset's data.vocab_size (what the tiny studies train)
    "study": [(128, L, 4, 128, 32) for L in (2, 4, 8, 16)],
    "cpu-large": [(512, 8, 8, 512, 4), (1024, 16, 16, 512, 1)],
    "gpu": [(512, 8, 8, 512, 32), (1024, 16, 16, 512, 16), (2048, 16, 16, 1024, 8)],
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


class Stepper:
    """One model with its optimizer, stepping the way the trainer does (clipping, one loss sync per step)."""

    def __init__(self, model, cfg: Config, hf: bool = False, compiled: str = ""):
        self.base, self.hf, self.cfg = model, hf, cfg
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.model = torch.compile(model) if compiled == "whole" else model  # as `depthlab train` with trainer.compile
        if compiled == "blocks":
            for block in model.blocks:
                block.compile()

    def step(self, x, y, autocast, stats: LayerStats | None = None) -> float:
        with autocast, stats.attached(self.base) if stats is not None else contextlib.nullcontext():
            if self.hf:
                logits = self.model(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            else:
                loss = self.model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.base.parameters(), self.cfg.optimizer.grad_clip)
        value = loss.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


def timed(device, fn, *args) -> float:
    sync(device)
    t = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t


COMPILED = ("compiled", "blocks")
TRAINERS = ("eager", *COMPILED, "hf")


def stats_line(stepper: Stepper, batch, autocast, cfg: Config, step: int, log: JsonlLog) -> dict:
    """A statistics step as the trainer takes it: hooked forward, the step, the one sync, the layer_stats line."""
    stats = LayerStats(cfg.model.n_layers, batch[0].device, moments=cfg.trainer.stats_moments)
    stepper.step(*batch, autocast, stats)
    record = {"step": step, "tokens": step * batch[0].numel(), **stats.finish()}
    log.write(record)
    return record


def bench_shape(base: Config, shape, device, dtype, repeats: int, stats_interval: int, run_steps: int,
                tmp: Path) -> dict:
    d, L, heads, T, batch = shape
    cfg = copy.deepcopy(base)
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = d, L, heads, T
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    V = cfg.model.vocab_size
    torch.manual_seed(0)
    ours = Transformer(cfg.model)
    hf = to_hf(ours).to(device)
    hf.config._attn_implementation = "sdpa"
    twins = [Transformer(cfg.model) for _ in range(2)]
    for twin in twins:
        twin.load_state_dict(ours.state_dict())
    steppers = {"eager": Stepper(ours.to(device), cfg),
                "compiled": Stepper(twins[0].to(device), cfg, compiled="whole"),
                "blocks": Stepper(twins[1].to(device), cfg, compiled="blocks"), "hf": Stepper(hf, cfg, hf=True)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (batch, T + 1), generator=gen).to(device) for _ in range(repeats + 2)]
    xy = [(b[:, :-1], b[:, 1:]) for b in batches]

    first = {k: timed(device, s.step, *xy[0], autocast) for k, s in steppers.items()}
    losses = {k: s.step(*xy[1], autocast) for k, s in steppers.items()}  # second step: same batch, same weights
    default = steppers["compiled" if TrainerConfig().compile else "eager"]
    tmp.mkdir(parents=True)
    log = JsonlLog(tmp / "layer_stats.jsonl", None)
    record = stats_line(default, xy[1], autocast, cfg, 0, log)  # warm-up (compiled: the hooked graph compiles)
    times = {k: [] for k in steppers}
    stats_times = []
    for i, b in enumerate(xy[2:]):
        for key, s in steppers.items():
            times[key].append(timed(device, s.step, *b, autocast))
        stats_times.append(timed(device, stats_line, default, b, autocast, cfg, i + 1, log))
    log.close()
    # The loggers over one whole cycle of logging.profile_every lines (one draws the profile figure), per line.
    loggers = Loggers(cfg, tmp)
    cycle = max(cfg.logging.profile_every, 1)
    logger_s = timed(device, lambda: [loggers.layer_stats({**record, "step": k}) for k in range(cycle)]) / cycle
    loggers.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    flops = param_counts(cfg.model).flops_per_token * batch * T
    plain = med["compiled" if default is steppers["compiled"] else "eager"]
    compile_s = {k: first[k] - med[k] for k in COMPILED}
    return {
        "shape": f"d{d} L{L} T{T} b{batch} V{V}", "tokens": batch * T, "med": med, "flops": flops,
        "compile_s": compile_s,
        "run_ratio": {k: run_steps * med["hf"] / (compile_s[k] + run_steps * med[k]) for k in COMPILED},
        "stats": (statistics.median(stats_times) - plain + logger_s) / stats_interval / plain,
        "logger": logger_s / stats_interval / plain,
        "loss_gap": max(abs(v - losses["eager"]) for v in losses.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", choices=list(SHAPES), default=None, help="study on CPU, gpu on CUDA")
    p.add_argument("--layers", default="", help="only these depths, e.g. 2,4 (default: every shape of --shapes)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per trainer and shape, after 2 warm-up steps")
    p.add_argument("--stats-interval", type=int, default=None, help="default: the tiny preset's (20)")
    p.add_argument("--run-steps", type=int, default=600, help="run length the compile time is amortised over")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's, i.e. the cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    base = load_config("tiny")
    base.logging.tensorboard = True
    interval = args.stats_interval or base.trainer.stats_interval
    shapes = SHAPES[args.shapes or ("gpu" if device.type == "cuda" else "study")]
    if args.layers:
        shapes = [s for s in shapes if str(s[1]) in args.layers.split(",")]
    load_before = os.getloadavg()
    name = str(dtype).removeprefix("torch.")
    peak = matmul_peak(device, dtype)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda"
                                                         else ""))
    print(f"load average (1/5/15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}")
    print(f"measured {name} matmul peak (1024³): {peak / 1e9:.1f} GFLOP/s; training dtype {name}; "
          f"median of {args.repeats} interleaved steps; statistics every {interval} steps on the "
          f"{'compiled' if TrainerConfig().compile else 'eager'} model (the trainer.compile default)\n")
    print("| shape | tok/s eager / compiled / per-block / HF | ×HF eager / compiled / per-block | compile s "
          f"compiled / per-block | {args.run_steps}-step ×HF compiled / per-block | MFU eager / compiled / per-block "
          "/ HF | stats overhead (logger) | max loss gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(shapes):
            r = bench_shape(base, shape, device, dtype, args.repeats, interval, args.run_steps, Path(tmp) / str(i))
            tok = {k: r["tokens"] / r["med"][k] for k in TRAINERS}
            cells = [" / ".join(f"{tok[k]:,.0f}" for k in TRAINERS),
                     " / ".join(f"{tok[k] / tok['hf']:.2f}x" for k in TRAINERS[:-1]),
                     " / ".join(f"{r['compile_s'][k]:.1f}" for k in COMPILED),
                     " / ".join(f"{r['run_ratio'][k]:.2f}x" for k in COMPILED),
                     " / ".join(f"{100 * r['flops'] / r['med'][k] / peak:.1f}%" for k in TRAINERS),
                     f"{100 * r['stats']:.1f}% ({100 * r['logger']:.1f}%)", f"{r['loss_gap']:.1e}"]
            print(f"| {r['shape']} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average (1/5/15 min) after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
