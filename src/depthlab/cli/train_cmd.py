"""`depthlab train`: train a model from a preset or YAML config with dotted overrides."""

from __future__ import annotations

from depthlab.config import load_config


def register(sub, help_: str) -> None:
    p = sub.add_parser("train", help=help_, description="Train a decoder-only LM, logging per-layer statistics. "
                       "Any config key can be overridden: --model.n_layers=32 --optimizer.weight_decay=0.1 "
                       "(see 'depthlab config --keys'). Multi-GPU/CPU data parallel: "
                       "torchrun --nproc_per_node=K -m depthlab train ...",
                       epilog="example: depthlab train --preset tiny --model.n_layers=8 --out runs/l8")
    p.add_argument("config", nargs="?", help="YAML config file (alternative to --preset)")
    p.add_argument("--preset", help="named preset (see 'depthlab config --presets'); default: tiny")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from depthlab.errors import ConfigError
    from depthlab.train.trainer import train

    if args.config and args.preset:
        raise ConfigError("give either a config file or --preset, not both")
    cfg = load_config(args.config or args.preset or "tiny", args.overrides)
    train(cfg, args.out, resume=args.resume)
    return 0
