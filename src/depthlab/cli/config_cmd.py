"""`depthlab config`: list presets and config keys, or print a resolved config."""

from __future__ import annotations

import yaml

from depthlab import config as cfgmod


def register(sub, help_: str) -> None:
    p = sub.add_parser("config", help=help_, description="Show presets and config keys, or print the fully "
                       "resolved config for a preset/YAML file plus dotted overrides.")
    p.add_argument("source", nargs="?", help="preset name or YAML file (default: built-in defaults)")
    p.add_argument("--keys", action="store_true", help="list every config key with its type, default and meaning")
    p.add_argument("--presets", action="store_true", help="list the named presets")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    if args.presets:
        for name in cfgmod.preset_names():
            first = cfgmod.preset_path(name).read_text().splitlines()[0].lstrip("# ")
            print(f"{name:20s} {first}")
        return 0
    if args.keys:
        for key, type_name, default, doc in cfgmod.describe():
            print(f"{key:34s} {type_name:18s} {default!r:12}  {doc}")
        return 0
    cfg = cfgmod.load_config(args.source, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
