"""`depthlab train`: train a model from a preset or YAML config with dotted overrides."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("train", help=help_, description="Train a decoder-only LM, logging per-layer statistics. "
                       "Any config key can be overridden: --model.n_layers=32 (or --model.n_layers 32) "
                       "--optimizer.weight_decay=0.1 (see 'depthlab config --keys'). --resume continues a run from "
                       "its own config.yaml; overrides on resume may change how long it trains "
                       "(--trainer.max_steps), intervals, logging and the device, nothing that changes the model or "
                       "the data order. Multi-GPU/CPU data parallel: torchrun --nproc_per_node=K -m depthlab train "
                       "...",
                       epilog="example: depthlab train --preset tiny --model.n_layers=8 --out runs/l8; then "
                       "depthlab train --out runs/l8 --resume --trainer.max_steps=400 extends it")
    p.add_argument("config", nargs="?", help="YAML config file (alternative to --preset)")
    p.add_argument("--preset", help="named preset (see 'depthlab config --presets'); default: tiny")
    common.add_out(p, "run folder to create (or to continue with --resume)", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                   "(its saved config; a preset or config file given too must match it)")
    common.add_device(p, default=None)
    common.add_dtype(p, default=None, choices=("auto", "fp32", "bf16"))
    p.add_argument("--seed", type=int, default=None, help="seed of the initialisation and data order "
                   "(default: the config's trainer.seed)")
    common.add_quiet(p)
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from depthlab.config import load_config, parse_overrides
    from depthlab.errors import ConfigError
    from depthlab.train.trainer import resume_config, train

    if args.config is not None and args.preset is not None:
        raise ConfigError("give either a config file or --preset, not both")
    if "" in (args.config, args.preset):  # an empty name would silently mean the default preset
        raise ConfigError("the config file or --preset is empty: name a YAML file or a preset "
                          "(see 'depthlab config --presets')")
    overrides = parse_overrides(args.overrides)
    for key, value in (("trainer.device", args.device), ("trainer.dtype", args.dtype), ("trainer.seed", args.seed),
                       ("logging.progress", False if args.quiet else None)):
        if value is not None:
            overrides[key] = value
    if args.resume:  # the run's own config.yaml is the base: a preset or file given too is not read again
        cfg = resume_config(args.out, overrides)
    else:
        cfg = load_config(args.config or args.preset or "tiny", overrides)  # neither given: the tiny preset
    train(cfg, args.out, resume=args.resume)
    return 0
