"""depthlab's scorer vs lm-evaluation-harness on the same model, tasks and examples: speed and agreement.

    .venv/bin/python benchmarks/eval_speed.py --model smollm2 --tasks piqa,arc_easy --limit 500

Loads the model once, runs ``depthlab.eval.evaluate`` and the lm-eval bridge (lm-eval's own task configs on the
bundled data, ``HFLM`` on the same model object, same batch size), and reports wall time, per-example decision
agreement (acc and acc_norm) and the largest log-likelihood difference. ``--compare-dtype bf16`` also scores the
first ``--compare-limit`` examples with the model cast to that dtype and reports how many decisions stay the same as
in the model's own dtype. Prints Markdown tables and writes the numbers as JSON with --out. Not a test: it needs the
``eval`` extra and minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from depthlab.eval import evaluate
from depthlab.eval.lmeval import evaluate_lmeval
from depthlab.loading import load_model


def _agreement(ours: list[dict], theirs: list[dict]) -> dict:
    theirs = sorted(theirs, key=lambda s: s["doc_id"])
    assert len(ours) == len(theirs)
    diff = max(abs(a - b[0]) for o, t in zip(ours, theirs)
               for a, b in zip(o["loglikelihoods"], t["filtered_resps"]))
    return {"examples": len(ours),
            "acc_agreement": sum(o["acc"] == t["acc"] for o, t in zip(ours, theirs)) / len(ours),
            "acc_norm_agreement": sum(o["acc_norm"] == t["acc_norm"] for o, t in zip(ours, theirs)) / len(ours),
            "max_abs_loglikelihood_diff": diff}


def _versus_lm_eval(model, tokenizer, tasks: list[str], args) -> dict:
    start = time.perf_counter()
    ours = evaluate(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, log_samples=True,
                    model_name=args.model)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = evaluate_lmeval(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                             log_samples=True)
    theirs_s = time.perf_counter() - start
    report = {"depthlab_seconds": round(ours_s, 1), "lm_eval_seconds": round(theirs_s, 1),
              "speedup": round(theirs_s / ours_s, 2), "tasks_detail": {}}
    print("| task | n | depthlab acc / acc_norm | lm-eval acc / acc_norm | decisions agree (acc, acc_norm) | "
          "max |Δ loglik| |\n|---|---|---|---|---|---|")
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        agree = _agreement(ours["samples"][task], theirs["samples"][task])
        report["tasks_detail"][task] = {"depthlab": {k: a[k] for k in ("acc,none", "acc_norm,none")},
                                        "lm_eval": {k: b[k] for k in ("acc,none", "acc_norm,none")}, **agree}
        print(f"| {task} | {agree['examples']} | {a['acc,none']:.4f} / {a['acc_norm,none']:.4f} | "
              f"{b['acc,none']:.4f} / {b['acc_norm,none']:.4f} | {100 * agree['acc_agreement']:.1f}% / "
              f"{100 * agree['acc_norm_agreement']:.1f}% | {agree['max_abs_loglikelihood_diff']:.1e} |")
    print(f"\nwall time: depthlab {ours_s:.1f} s, lm-eval {theirs_s:.1f} s, speedup {theirs_s / ours_s:.2f}x "
          f"(batch size {args.batch_size}, {torch.get_num_threads()} threads, {model.dtype})")
    return report


def _versus_dtype(model, tokenizer, tasks: list[str], args) -> dict:
    kwargs = {"limit": args.compare_limit, "batch_size": args.batch_size, "log_samples": True}
    reference = evaluate(model, tokenizer, tasks, **kwargs)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.compare_dtype]
    start = time.perf_counter()
    cast = evaluate(model.to(dtype), tokenizer, tasks, **kwargs)
    seconds = time.perf_counter() - start
    model.to(torch.float32)
    out = {"dtype": args.compare_dtype, "seconds": round(seconds, 1)}
    for task in tasks:
        out[task] = {"examples": len(reference["samples"][task]),
                     **{f"{m}_agreement": sum(a[m] == b[m] for a, b in zip(reference["samples"][task],
                                                                             cast["samples"][task]))
                        / len(reference["samples"][task]) for m in ("acc", "acc_norm")},
                     "acc": [reference["results"][task]["acc,none"], cast["results"][task]["acc,none"]]}
        print(f"{args.compare_dtype} vs {model.dtype} on {task}: decisions agree {100 * out[task]['acc_agreement']:.1f}% "
              f"(acc), {100 * out[task]['acc_norm_agreement']:.1f}% (acc_norm) over {out[task]['examples']} examples")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="piqa,arc_easy")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--compare-dtype", choices=["bf16", "fp16"], help="also measure decision agreement in this "
                        "dtype vs the model's own")
    parser.add_argument("--compare-limit", type=int, default=50, help="examples per task for --compare-dtype")
    parser.add_argument("--skip-lm-eval", action="store_true", help="only the dtype comparison")
    parser.add_argument("--out", help="write the numbers here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    model, tokenizer = load_model(args.model)

    report = {"model": args.model, "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "dtype": str(model.dtype)}
    if not args.skip_lm_eval:
        report.update(_versus_lm_eval(model, tokenizer, tasks, args))
    if args.compare_dtype:
        report["dtype_agreement"] = _versus_dtype(model, tokenizer, tasks, args)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
