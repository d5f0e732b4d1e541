"""The embedded default, end to end, offline on a CPU: what `depthlab demo` (and `make demo`) runs.

Prepares the bundled Shakespeare corpus, trains the `tiny` preset (resuming if interrupted; a finished run resumes
to a no-op), plots its per-layer variance profile and samples from it; then analyses the real SmolLM2-135M-Instruct
(bundled GGUF) with the default metric set, resuming finished metrics. Every step is idempotent, so rerunning after
an interruption continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoResult:
    run_dir: Path
    """The tiny training run."""
    variance_plot: Path
    """Its per-layer variance profile (PNG)."""
    sample: str
    """A text sample from it."""
    analysis_dir: Path | None
    """The SmolLM2 analysis folder (None with analysis=False)."""
    analysis: dict | None
    """Its results (what results.json holds)."""


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | dict | None = None, *, analysis: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into `out` (`overrides` apply to the tiny training config); `log` receives the progress lines."""
    from depthlab.analysis.runner import format_summary, run_analysis
    from depthlab.config import load_config
    from depthlab.data import default_dataset
    from depthlab.loading import load_model
    from depthlab.model.generate import generate_text
    from depthlab.rundir import RunDir
    from depthlab.train.plots import plot_variance_profile
    from depthlab.train.trainer import train

    out = Path(out)
    cfg = load_config("tiny", overrides)
    log("[1/4] preparing the bundled Shakespeare corpus" if not cfg.data.path else "[1/4] data: --data.path")
    log(f"      dataset: {cfg.data.path or default_dataset(cfg.data.vocab_size)}")
    run_dir = out / "tiny"
    resume = RunDir(run_dir).config_path.exists()
    log(f"[2/4] training the tiny preset into {run_dir}" + (" (resuming)" if resume else ""))
    train(cfg, run_dir, resume=resume)
    plot = plot_variance_profile(run_dir)
    log("[3/4] sampling")
    model, tokenizer = load_model(run_dir)
    sample = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=60, temperature=0.8)
    log(sample)
    log(f"      run {run_dir} (metrics.jsonl, layer_stats.jsonl, checkpoints/), variance plot {plot}")
    if not analysis:
        return DemoResult(run_dir, Path(plot), sample, None, None)
    analysis_dir = out / "smollm2-analysis"
    log(f"[4/4] analysing SmolLM2-135M-Instruct into {analysis_dir}")
    # `depthlab analyze smollm2`'s own defaults: 8x128 evaluation tokens, usefulness maps fitted on a separate
    # 32·(d+1)-token sample (an exact in-sample fit made every block look replaceable)
    results = run_analysis("smollm2", analysis_dir)
    log(format_summary(results))
    return DemoResult(run_dir, Path(plot), sample, analysis_dir, results)
