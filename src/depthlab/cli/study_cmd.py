"""`depthlab study run|status|list|show`: sweeps of training runs, each trained, measured and resumable."""

from __future__ import annotations

import argparse

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("study", help=help_, description=f"{help_}. See docs/studies.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    r = actions.add_parser("run", help="run (or resume) a study's unfinished runs",
                           description="Train and measure every unfinished run of a study, each in its own process. "
                           "Finished runs (done.json) are skipped; failed or interrupted ones resume from their last "
                           "checkpoint. On a cluster, submit one job per run with --only RUN_NAME (see "
                           "'depthlab study show') and run 'depthlab report' when they are done. Extra "
                           "--section.key=value arguments override every run's config (e.g. --data.path=DIR) and "
                           "are recorded in the study's spec.")
    r.add_argument("spec", metavar="NAME|SPEC.yaml", help="a built-in study (see 'depthlab study list') or a YAML")
    r.add_argument("--scale", default=None, help="scale of a built-in study: tiny (default), small, paper")
    r.add_argument("--out", default=None, help="study folder (default ./studies/NAME-SCALE)")
    r.add_argument("--jobs", type=common.Number(int, 1), default=1, help="runs at once on this machine (default 1)")
    r.add_argument("--only", action="append", default=None, metavar="RUN_NAME",
                   help="run only this run (repeatable): one cluster job per run")
    r.add_argument("--nproc-per-node", type=common.Number(int, 1), default=1, metavar="K",
                   help="launch each run with torchrun on K processes (GPUs) (default 1: plain python)")
    r.set_defaults(func=_run, accepts_overrides=True)

    s = actions.add_parser("status", help="done / running / failed / pending runs of a study folder")
    s.add_argument("study_dir", metavar="DIR")
    s.set_defaults(func=_status)

    ls = actions.add_parser("list", help="the built-in studies, their scales, expected runtimes and GPU-hours")
    ls.set_defaults(func=_list)

    sm = actions.add_parser("smoke", help="a few training steps of built-in studies, to check a (GPU) machine",
                            description="Run each built-in study (default: all) at --scale (default small) for "
                            "--steps training steps, checkpointing every step, without torch.compile, with "
                            "measurements on a few examples and only its largest run (most parameters × context) "
                            "unless --all-runs. Exit 0 when every smoke run finished. The GPU check script runs "
                            "'depthlab study smoke --out DIR'.")
    sm.add_argument("names", nargs="*", metavar="NAME", help="built-in studies (default: all)")
    sm.add_argument("--scale", default="small")
    sm.add_argument("--out", default="studies/smoke", help="parent folder of the smoke study folders "
                    "(default studies/smoke)")
    sm.add_argument("--steps", type=common.Number(int, 1), default=2, help="training steps per run (default 2)")
    sm.add_argument("--all-runs", action="store_true", help="every run of each study, not only its largest")
    sm.set_defaults(func=_smoke)

    sh = actions.add_parser("show", help="the runs a study would make (one name per line, for cluster scripts)")
    sh.add_argument("spec", metavar="NAME|SPEC.yaml")
    sh.add_argument("--scale", default=None)
    sh.add_argument("--verbose", action="store_true", help="also each run's overrides")
    sh.set_defaults(func=_show)


def _run(args) -> int:
    from depthlab.config import parse_overrides
    from depthlab.study.runner import run_study

    states = run_study(args.spec, args.out, scale=args.scale, jobs=args.jobs, only=args.only,
                       nproc_per_node=args.nproc_per_node, overrides=parse_overrides(args.overrides))
    return 0 if all(s == "done" for s in states.values()) else 1


def _status(args) -> int:
    from depthlab.study.runner import format_status, study_status

    print(format_status(study_status(args.study_dir), args.study_dir))
    return 0


def _list(args) -> int:
    from depthlab.study.spec import builtin_names, builtin_scales, load_spec

    for name in builtin_names():
        spec = load_spec(name)
        print(f"{name}: {spec.description}")
        for scale, about in builtin_scales(name).items():
            hours = f"≈{about['gpu_hours']:g} GPU-hours; " if about["gpu_hours"] else ""
            print(f"    {scale:<6} {hours}{about['runtime']}")
    return 0


def _smoke(args) -> int:
    from depthlab.study.runner import smoke
    from depthlab.study.spec import builtin_names

    results = smoke(args.names or builtin_names(), args.out, scale=args.scale, steps=args.steps,
                    all_runs=args.all_runs)
    return 0 if all(s == "done" for states in results.values() for s in states.values()) else 1


def _show(args) -> int:
    from depthlab.study.spec import load_spec

    spec = load_spec(args.spec, args.scale)
    for run in spec.resolve():
        print(f"{run.name}  {run.setting} seed={run.seed}" if args.verbose else run.name)
    return 0
