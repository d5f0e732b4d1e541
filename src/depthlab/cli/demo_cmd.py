"""`depthlab demo`: the embedded default, end to end, offline on a CPU.

Prepares the bundled Shakespeare corpus, trains the `tiny` preset (resuming if interrupted, skipped if finished),
plots its per-layer variance profile and prints a sample; then analyses the real SmolLM2-135M-Instruct (bundled GGUF)
with the default metric set (resuming finished metrics).
"""

from __future__ import annotations

from pathlib import Path


def register(sub, help_: str) -> None:
    p = sub.add_parser("demo", help=help_, description="Run depthlab's main job on its embedded default: prepare "
                       "the bundled corpus, train the tiny preset, plot its per-layer variance and sample from it, "
                       "then analyse SmolLM2-135M (how well it uses its 30 layers). Rerunning resumes or skips "
                       "finished work. Dotted overrides apply to the tiny training config.")
    p.add_argument("--out", default="runs/demo", help="demo folder (default: %(default)s)")
    p.add_argument("--skip-analysis", action="store_true", help="only the training part")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from depthlab.analysis.runner import format_summary, run_analysis
    from depthlab.config import load_config
    from depthlab.data import default_dataset
    from depthlab.loading import load_model
    from depthlab.model.generate import generate_text
    from depthlab.train.checkpoint import list_checkpoints
    from depthlab.train.plots import plot_variance_profile
    from depthlab.train.trainer import train

    out = Path(args.out)
    print("[1/4] preparing the bundled Shakespeare corpus")
    data = default_dataset()
    print(f"      dataset: {data}")
    cfg = load_config("tiny", args.overrides)
    run_dir = out / "tiny"
    done = list_checkpoints(run_dir / "checkpoints")
    finished = bool(done) and int(done[-1].name.split("_")[1]) >= cfg.trainer.max_steps
    print(f"[2/4] training the tiny preset into {run_dir}" + (" (already finished)" if finished else ""))
    if not finished:
        train(cfg, run_dir, resume=(run_dir / "config.yaml").exists())
    plot = plot_variance_profile(run_dir)
    print("[3/4] sampling")
    model, tokenizer = load_model(run_dir)
    print(generate_text(model, tokenizer, "ROMEO:", max_new_tokens=60, temperature=0.8))
    print(f"      run {run_dir} (metrics.jsonl, layer_stats.jsonl, checkpoints/), variance plot {plot}")
    if args.skip_analysis:
        return 0
    analysis_dir = out / "smollm2-analysis"
    print(f"[4/4] analysing SmolLM2-135M-Instruct into {analysis_dir}")
    # 16x256 = 4096 tokens: several times the 577 coefficients each block's affine fit has, so the usefulness
    # loss ratios are not inflated by an exact fit (the CLI's smaller default is meant for quick looks).
    results = run_analysis("smollm2", analysis_dir, num_samples=16, seq_len=256)
    print(format_summary(results))
    print(f"\nresults: training run {run_dir}, analysis {analysis_dir}/results.json (+ CSVs and PNG plots)")
    return 0
