"""`depthlab eval`: perplexity and downstream scores of any model (a thin layer over depthlab.eval)."""

from __future__ import annotations

import sys

from depthlab.cli import common
from depthlab.eval.tasks import TASKS


def register(sub, help_: str) -> None:
    p = sub.add_parser(
        "eval", help=help_,
        description="Multiple-choice accuracy (acc, acc_norm) and generative exact match, zero- or few-shot, with "
                    "lm-evaluation-harness's prompts and results layout, and perplexity / bits-per-byte on held-out "
                    f"text. Tasks: {', '.join(TASKS)}.",
        epilog="examples: depthlab eval smollm2 --tasks piqa,arc_easy --limit 200 | "
               "depthlab eval smollm2 --tasks mmlu --num-fewshot 5 | "
               "depthlab eval runs/l8 --tasks all --ppl-data shakespeare --out results/l8")
    common.add_model(p)
    p.add_argument("--tasks", help="comma-separated task names or 'all' (default: all, unless only --ppl-data is "
                   "given)")
    p.add_argument("--limit", type=common.Number(int, 1), help="score only the first N examples of each task (a fixed subset)")
    p.add_argument("--num-fewshot", type=common.Number(int, 0), default=0, metavar="K",
                   help="answered examples before each prompt (default 0; mmlu: the first K dev questions of the "
                   "subject, at most 5; others: K other documents of the split, chosen with --seed)")
    common.add_seed(p, "seed of the few-shot choice (lm-eval's default)", default=1234)
    p.add_argument("--ppl-data", help="also measure perplexity on: 'shakespeare' (bundled held-out plays), a "
                   "prepared dataset folder (its val split), or a .txt/.jsonl/.parquet file")
    p.add_argument("--ppl-context", type=common.Number(int, 1), help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--ppl-stride", type=common.Number(int, 1), help="how far perplexity windows advance (default: the window, i.e. "
                   "no overlap)")
    p.add_argument("--batch-size", type=common.Number(int, 1), default=64, help="at most this many rows per forward pass (default 64; "
                   "with --backend lm-eval: its batch size)")
    p.add_argument("--max-batch-tokens", type=common.Number(int, 1), default=2048, help="at most this many padded tokens per forward "
                   "pass (default 2048; raise it on a GPU)")
    common.add_dtype(p)
    common.add_device(p)
    common.add_out(p, "folder for results.json (and samples_<task>.jsonl with --log-samples)")
    common.add_json(p, "results.json")
    common.add_quiet(p)
    p.add_argument("--log-samples", action="store_true", help="also write each example's log-likelihoods or "
                   "generation")
    p.add_argument("--backend", choices=["depthlab", "lm-eval"], default="depthlab",
                   help="scorer: depthlab's (default) or lm-evaluation-harness on the same model and data")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.errors import EvalError
    from depthlab.eval import evaluate, format_table, save_results
    from depthlab.eval.tasks import check_fewshot, resolve_tasks

    if args.ppl_data == "":  # argparse hands an empty value through; it would silently mean "no perplexity"
        raise EvalError("--ppl-data is empty: give 'shakespeare', a dataset folder or a text file")
    tasks = args.tasks if args.tasks is not None else (None if args.ppl_data else "all")
    # fail on a bad task name or few-shot count before spending time loading the model
    for name in resolve_tasks(tasks) if tasks is not None else []:
        check_fewshot(name, args.num_fewshot)
    if args.log_samples and not args.out:
        raise EvalError("--log-samples writes files: give --out DIR")
    if args.backend == "lm-eval" and args.ppl_data:
        raise EvalError("--ppl-data is measured by the depthlab backend only; drop --backend lm-eval")

    from depthlab.loading import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    progress = not args.quiet and sys.stderr.isatty()
    if args.backend == "lm-eval":
        from depthlab.eval.lmeval import evaluate_lmeval

        results = evaluate_lmeval(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                  fewshot_seed=args.seed, batch_size=args.batch_size, log_samples=args.log_samples)
    else:
        results = evaluate(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                           fewshot_seed=args.seed, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                           ppl_data=args.ppl_data, ppl_context=args.ppl_context, ppl_stride=args.ppl_stride,
                           log_samples=args.log_samples, progress=progress, model_name=args.model)
    path = save_results(results, args.out) if args.out else None
    if common.emit_json(args, {k: v for k, v in results.items() if k != "samples"}):
        return 0
    print(format_table(results))
    if path:
        print(f"wrote {path}")
    return 0
