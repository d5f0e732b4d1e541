"""`depthlab recipe`: write a training config for a depth-effective model (the paper's rule of thumb)."""

from __future__ import annotations

import sys
from pathlib import Path

from depthlab.cli import common
from depthlab.errors import ConfigError
from depthlab.fileio import atomic_write_text


def register(sub, help_: str) -> None:
    p = sub.add_parser("recipe", help=help_, description=(
        "Write a YAML training config with context 4096, weight decay 0.3 on matrices, GQA G=2 and an MoE "
        "FFN with k/E = 1/8, sized so the active parameters match the target. Each choice is explained, with "
        "the paper's evidence, in the file's comments. Train it with 'depthlab train FILE'."))
    p.add_argument("--layers", type=int, required=True, help="number of blocks L")
    p.add_argument("--active-params", required=True, help="target active parameters, e.g. 400M, 1.2B, 1e9 "
                   "(non-expert + k/E of expert parameters, embeddings excluded)")
    p.add_argument("--budget-tokens", help="training tokens, e.g. 5B (default 20 per active parameter)")
    p.add_argument("--count-embeddings", action="store_true",
                   help="include the embedding and LM head (vocabulary 50304) in the active parameters")
    p.add_argument("--data", default=None, metavar="DIR", help="prepared dataset folder to train on (data.path; "
                   "default: the bundled corpus, with a warning when it is far too small for the budget)")
    common.add_out(p, "YAML file to write (default: print to stdout)", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.tools.recipe import data_warning, make_recipe, recipe_yaml

    cfg, explanations = make_recipe(args.layers, args.active_params, args.budget_tokens,
                                    count_embeddings=args.count_embeddings, data=args.data)
    warning = data_warning(cfg)
    if warning:
        print(f"depthlab recipe: warning: {warning}", file=sys.stderr)
    text = recipe_yaml(cfg, [*explanations, *([f"WARNING: {warning}"] if warning else [])])
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e}") from None
    for line in explanations:
        print(f"- {line}")
    print(f"wrote {out} (train it with: depthlab train {out})")
    return 0
