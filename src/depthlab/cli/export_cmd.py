"""`depthlab export`: write a run as a standard Hugging Face model folder."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("export", help=help_, description="Export a depthlab run (latest checkpoint) or checkpoint "
                       "folder to a standard Hugging Face folder (Llama; Qwen3 with QK-norm; an HF MoE family for "
                       "MoE) that AutoModelForCausalLM.from_pretrained loads without custom code.")
    p.add_argument("run", help="run folder or checkpoint folder")
    common.add_out(p, "output folder: new or empty, or replaced atomically with --overwrite", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never the run itself, a "
                   "folder holding it, the home or current folder)")
    p.add_argument("--analysis", default=None, metavar="DIR", help="a 'depthlab analyze' folder whose summary goes "
                   "into the model card (default: RUN/analysis when it exists)")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.errors import ModelLoadError
    from depthlab.model.hf import export_hf
    from depthlab.model.io import is_depthlab_path

    if not is_depthlab_path(args.run):
        raise ModelLoadError(f"{args.run} is not a depthlab run or checkpoint folder")
    out = export_hf(args.run, args.out, overwrite=args.overwrite, analysis=args.analysis)
    print(f"exported to {out}")
    return 0
