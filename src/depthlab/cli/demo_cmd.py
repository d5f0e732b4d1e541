"""`depthlab demo`: the embedded default, end to end, offline on a CPU (`depthlab.tools.demo.run_demo`)."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("demo", help=help_, description="Run depthlab's main job on its embedded default: prepare "
                       "the bundled corpus, train the tiny preset, plot its per-layer variance and sample from it, "
                       "then analyse SmolLM2-135M (how well it uses its 30 layers). Rerunning resumes or skips "
                       "finished work. Dotted overrides apply to the tiny training config.")
    common.add_out(p, "demo folder", default="runs/demo")
    p.add_argument("--skip-analysis", action="store_true", help="only the training part")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from depthlab.tools.demo import run_demo

    result = run_demo(args.out, args.overrides, analysis=not args.skip_analysis)
    where = f", analysis {result.analysis_dir}/results.json (+ CSVs and PNG plots)" if result.analysis_dir else ""
    print(f"\nresults: training run {result.run_dir}{where}")
    return 0
