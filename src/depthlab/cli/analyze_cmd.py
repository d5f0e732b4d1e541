"""`depthlab analyze MODEL`: layer-effectiveness and sparsity metrics → results.json, CSVs, plots, a summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from depthlab.analysis.defaults import DEFAULT_METRICS, FIT_TOKENS_PER_COEF, MAX_FIT_TOKENS
from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "analyze", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nDefaults are sized for a CPU: the metrics are evaluated on 8 sequences x 128 "
        "tokens, in fp32 unless the CPU has native bf16 units (--dtype auto: bf16 matmuls are emulated and far "
        "slower on AVX2-only CPUs; bf16 is the default on CUDA and on CPUs with AVX512-BF16/AMX), and the "
        f"usefulness maps are fitted on a separate, disjoint sample of {FIT_TOKENS_PER_COEF}*(d+1) tokens per map "
        f"(at most {MAX_FIT_TOKENS}), which needs only the cheap baseline pass; SmolLM2 takes a few minutes on 2 "
        "cores. The text is held out from the model's own training run (depthlab runs) or is the held-out "
        "Shakespeare plays. Finished metrics are saved as they complete: rerunning the same command resumes.",
        epilog=f"default metrics (the same as depthlab.analyze): {','.join(DEFAULT_METRICS)} (moe only for MoE "
        "models; permutation over adjacent pairs). 'all' adds jacobian (Rademacher estimate), lens, branches and "
        "tuned_lens (which trains translators: slow on a CPU for large vocabularies). Options per "
        "metric: --option usefulness.tau=0.2")
    common.add_model(p)
    p.add_argument("--metrics", default=None, help="comma-separated metric names, or 'all' (default: see below)")
    p.add_argument("--data", default=None, help="calibration text: a file/folder or prepared dataset "
                   "(default: held-out Shakespeare)")
    p.add_argument("--num-samples", type=common.Number(int, 1), default=8, help="sequences N (default 8)")
    p.add_argument("--seq-len", type=common.Number(int, 2), default=128, help="tokens per sequence T (default 128)")
    p.add_argument("--fit-samples", type=common.Number(int, 1), default=None,
                   help=f"sequences of the usefulness fit sample (default: {FIT_TOKENS_PER_COEF}*(d+1) tokens)")
    p.add_argument("--fit-seq-len", type=common.Number(int, 2), default=None, help="tokens per fit sequence (default: --seq-len)")
    common.add_seed(p)
    common.add_dtype(p)
    common.add_device(p)
    common.add_placement(p)
    p.add_argument("--cache-budget", default="2GiB", metavar="SIZE",
                   help="memory for cached baseline states (e.g. 512MiB); beyond it they are recomputed (default 2GiB)")
    p.add_argument("--micro-batch-size", type=common.Number(int, 1), default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric option, value parsed as JSON when possible (repeatable)")
    p.add_argument("--checkpoints", default=None, metavar="all|STEPS",
                   help="analyse a run's checkpoints (or a folder of model folders, e.g. HF checkpoint-N) on one "
                   "fixed sample: 'all' or steps like 100,200; writes tracking.csv and figures over steps "
                   "(default metrics usefulness,angular,lens,causal)")
    common.add_out(p, "output folder", default="analysis")
    common.add_json(p, "results.json")
    common.add_quiet(p)
    p.set_defaults(func=run)


def parse_options(items: list[str]) -> dict[str, dict]:
    from depthlab.errors import AnalysisError

    options: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        metric, dot, name = key.partition(".")
        if not sep or not dot or not metric or not name:
            raise AnalysisError(f"--option expects METRIC.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(metric, {})[name] = value
    return options


def run(args) -> int:
    from depthlab.rundir import folder_lock
    from depthlab.train.distributed import Dist

    dist = Dist.from_env()  # under torchrun: the sequences are split over the ranks (docs/scale.md)
    try:
        if dist.enabled:
            return _data_parallel(args, dist)
        with folder_lock(args.out, "analyze"):  # a second analyze into the same folder is refused, never interleaved
            return _track(args) if args.checkpoints is not None else _analyze(args)
    finally:
        if dist.enabled:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _data_parallel(args, dist) -> int:
    """Every rank computes the same all-reduced results; rank 0 writes them, the others into a scratch folder."""
    import tempfile

    from depthlab.errors import AnalysisError
    from depthlab.rundir import folder_lock

    if args.checkpoints is not None:
        raise AnalysisError("--checkpoints does not run under torchrun: analyse the checkpoints in one process")
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{dist.local_rank}"
    if dist.is_main:
        with folder_lock(args.out, "analyze"):
            return _analyze(args, data_parallel=True)
    with tempfile.TemporaryDirectory() as scratch:
        args.out, args.json, args.quiet = str(Path(scratch) / "analysis"), None, True
        return _analyze(args, data_parallel=True, main=False)


def _analyze(args, data_parallel: bool = False, main: bool = True) -> int:
    from depthlab.analysis.runner import format_summary, run_analysis
    from depthlab.model.dispatch import parse_device_map, parse_max_memory

    placement = {"device_map": args.device_map and parse_device_map(args.device_map),
                 "max_memory": args.max_memory and parse_max_memory(args.max_memory),
                 "offload_folder": args.offload_folder, "cache_budget": args.cache_budget}
    results = run_analysis(args.model, args.out, metrics=args.metrics, data=args.data, num_samples=args.num_samples,
                           seq_len=args.seq_len, fit_samples=args.fit_samples, fit_seq_len=args.fit_seq_len,
                           seed=args.seed, dtype=args.dtype, device=args.device, **placement,
                           data_parallel=data_parallel,
                           micro_batch_size=args.micro_batch_size, options=parse_options(args.option),
                           progress=not args.quiet, log=common.progress_log(args) if main else lambda line: None)
    if not main or common.emit_json(args, results):
        return 0
    print(format_summary(results))
    print(f"results: {args.out}/results.json")
    return 0


def _track(args) -> int:
    from depthlab.analysis.tracking import format_tracking, track_checkpoints

    tracking = track_checkpoints(args.model, args.out, checkpoints=args.checkpoints, metrics=args.metrics,
                                 data=args.data, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                                 dtype=args.dtype, device=args.device, micro_batch_size=args.micro_batch_size,
                                 options=parse_options(args.option), progress=not args.quiet,
                                 log=common.progress_log(args))
    if common.emit_json(args, tracking):
        return 0
    print(format_tracking(tracking))
    print(f"results: {args.out}/tracking.json, tracking.csv, tracking.png")
    return 0
