"""The one GPU check: training throughput and MFU, analysis of a 1B-parameter model, eval throughput, study smokes.

    bash benchmarks/gpu_check.sh               # one H100/H200: ≤ 8 minutes, prints one Markdown table
    bash benchmarks/gpu_check.sh --cpu-smoke   # the same code paths at toy sizes on a CPU (a few minutes)

Sections (each row of the table is one measurement; a section that fails prints its one-line error as its row and
the others still run):

* **train** — depthlab's Transformer, forward + backward + AdamW step on random token batches, bf16 autocast and
  ``torch.compile`` on GPU, at the paper's dense shape (d=2048, L=16, T=1024) and at the `small` study shape
  (d=768, L=12, T=1024). Tokens/s is the median over timed steps after the compile warm-up; MFU is model FLOPs
  (6·N_matmul + 12·L·d·T per token, depthlab.model.params) over the accelerator's nominal dense peak (H100/H200 SXM
  bf16: 989 TFLOP/s), with the measured 8192³ matmul peak printed beside it.
* **analyze** — every default metric of `depthlab.analyze` on a ≥ 1B-parameter model built from the `paper-1b` preset
  with random weights (bf16), on 64×512 evaluation tokens; seconds per metric.
* **eval** — `depthlab.eval.evaluate` of the bundled SmolLM2 on PIQA and ARC-Easy: examples per second.
* **study** — a 2-step smoke of each built-in study at its `small` scale (`depthlab.study.runner.smoke`, what `depthlab study smoke` runs).

``--cpu-smoke`` shrinks every shape (fp32, no compile, d=64 models, 4×64 tokens, 8 eval examples, 1-step studies at
the tiny scale) so the script is known to run before a GPU is available; its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import tempfile
import time

import torch

NOMINAL_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the device name."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)


def train_row(name: str, d: int, L: int, T: int, batch: int, steps: int, args, peak: float) -> dict:
    from depthlab.config import ModelConfig, OptimizerConfig
    from depthlab.model.params import param_counts
    from depthlab.model.transformer import Transformer
    from depthlab.train.optim import build_optimizer

    device = args.device
    cfg = ModelConfig(vocab_size=50304, d_model=d, n_layers=L, n_heads=max(1, d // 128), seq_len=T)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    optimizer = build_optimizer(model, OptimizerConfig())
    step_model = torch.compile(model) if args.compile else model
    bf16 = args.dtype == torch.bfloat16
    x = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
    times = []
    for i in range(steps + args.warmup):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(x, x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    tok_s = batch * T / statistics.median(times)
    mfu = param_counts(cfg).flops_per_token * tok_s / peak
    del model, step_model, optimizer
    return {"section": "train", "what": f"{name} (d={d} L={L} T={T} batch {batch})",
            "value": f"{tok_s:,.0f} tok/s", "detail": f"MFU {100 * mfu:.1f}%"}


def analyze_rows(args) -> list[dict]:
    import depthlab
    from depthlab.config import load_config
    from depthlab.model.params import human, param_counts
    from depthlab.model.transformer import Transformer

    overrides = {} if not args.cpu_smoke else {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4,
                                               "model.ffn_hidden": 256, "model.vocab_size": 512}
    cfg = load_config("paper-1b", overrides).model
    with torch.device(args.device):
        model = Transformer(cfg).to(args.dtype).eval()
    n, t = (4, 64) if args.cpu_smoke else (64, 512)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (n, t), generator=generator)
    fit = torch.randint(0, cfg.vocab_size, (4 * n, t), generator=generator)
    stamps = [("start", time.perf_counter())]
    depthlab.analyze(model, ids, fit_ids=fit, on_result=lambda name, _: stamps.append((name, time.perf_counter())))
    size = human(param_counts(cfg).total)
    rows = [{"section": "analyze", "what": f"{name} ({size} params, {n}×{t} tokens, {4 * n}×{t} fit)",
             "value": f"{end - begin:.1f} s", "detail": ""}
            for (_, begin), (name, end) in itertools.pairwise(stamps)]
    rows.append({"section": "analyze", "what": "all default metrics", "value": f"{stamps[-1][1] - stamps[0][1]:.1f} s",
                 "detail": _peak_memory(args.device)})
    return rows


def eval_rows(args) -> list[dict]:
    from depthlab.eval import evaluate
    from depthlab.loading import load_model

    model, tokenizer = load_model("smollm2", device=str(args.device), dtype="bf16" if args.dtype == torch.bfloat16
                                  else "fp32")
    limit = 8 if args.cpu_smoke else 500
    start = time.perf_counter()
    evaluate(model, tokenizer, ["piqa", "arc_easy"], limit=limit)
    seconds = time.perf_counter() - start
    return [{"section": "eval", "what": f"smollm2 piqa + arc_easy, {limit} each", "value": f"{2 * limit / seconds:.1f} ex/s",
             "detail": f"{seconds:.1f} s"}]


def study_rows(args) -> list[dict]:
    from depthlab.study.runner import smoke
    from depthlab.study.spec import builtin_names

    scale = "tiny" if args.cpu_smoke else "small"
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthlab-gpu-check-") as tmp:
        for name in builtin_names():
            start = time.perf_counter()
            states = smoke([name], tmp, scale=scale, steps=1 if args.cpu_smoke else 2, log=lambda *a: None)[name]
            bad = {run: state for run, state in states.items() if state != "done"}
            rows.append({"section": "study", "what": f"{name} {scale} smoke ({', '.join(states)})",
                         "value": "ok" if not bad else f"FAILED {bad}", "detail": f"{time.perf_counter() - start:.0f} s"})
    return rows


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU, to check the script runs")
    p.add_argument("--sections", default="train,analyze,eval,study", help="comma-separated subset to run")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    args.device = torch.device("cuda" if gpu else "cpu")
    args.dtype = torch.bfloat16 if gpu else torch.float32
    args.compile, args.warmup = gpu, (3 if gpu else 1)
    name = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine())
    measured = measured_matmul_peak(args.device, args.dtype, 8192 if gpu else 512)
    peak = nominal_peak(args.device) or measured
    print(f"# depthlab GPU check{' (CPU smoke: not a measurement)' if args.cpu_smoke else ''}\n\n"
          f"machine: {name}, torch {torch.__version__}, dtype {str(args.dtype).removeprefix('torch.')}, "
          f"compile {args.compile}; measured matmul peak {_flops(measured)}, MFU against "
          f"{_flops(peak)} ({'nominal' if peak != measured else 'measured'})\n", flush=True)
    sections = {
        "train": lambda: [train_row("paper dense 1B", *((64, 2, 64, 2) if args.cpu_smoke else (2048, 16, 1024, 8)),
                                    3 if args.cpu_smoke else 10, args, peak),
                          train_row("small study", *((64, 2, 64, 2) if args.cpu_smoke else (768, 12, 1024, 16)),
                                    3 if args.cpu_smoke else 10, args, peak)],
        "analyze": lambda: analyze_rows(args),
        "eval": lambda: eval_rows(args),
        "study": lambda: study_rows(args),
    }
    print("| section | what | result | detail |\n| --- | --- | --- | --- |", flush=True)
    failed = False
    for key in args.sections.split(","):
        start = time.perf_counter()
        try:
            rows = sections[key]()
        except Exception as exc:  # noqa: BLE001 — a failed section is a row of the table, the others still run
            failed = True
            rows = [{"section": key, "what": "FAILED", "value": type(exc).__name__, "detail": str(exc)[:200]}]
        for r in rows:
            print(f"| {r['section']} | {r['what']} | {r['value']} | {r['detail']} |", flush=True)
        print(f"<!-- {key}: {time.perf_counter() - start:.0f} s -->", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
