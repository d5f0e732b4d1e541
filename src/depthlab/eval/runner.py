"""`evaluate`: downstream accuracy (and optionally perplexity) of a model, in lm-evaluation-harness's result layout.

Per task: ``acc`` (the choice with the highest summed log-likelihood is the gold one) and ``acc_norm`` (the same after
dividing each log-likelihood by its choice's length in characters, lm-eval's definition), each with the standard error
of the mean (sample standard deviation over examples / sqrt(n), as lm-eval reports it). The macro average weighs
every task equally; its standard error assumes independent tasks, ``sqrt(sum se_i²) / k``.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import numpy as np

from depthlab import __version__
from depthlab.errors import EvalError
from depthlab.eval.heldout import perplexity
from depthlab.eval.scorer import loglikelihoods, model_device
from depthlab.eval.tasks import data_path, load_examples, resolve_tasks
from depthlab.loading import weights_hash

METRICS = ("acc", "acc_norm")


def _mean_stderr(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def _count_documents(task: str) -> int:
    with data_path(task).open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _score_task(model, tokenizer, task: str, limit: int | None, batch: dict, log_samples: bool,
                progress: bool) -> tuple[dict, list[dict]]:
    examples = load_examples(task, limit)
    requests = [r for ex in examples for r in ex.requests]
    groups = [i for i, ex in enumerate(examples) for _ in ex.requests]  # an example's choices share one row
    scores = iter(loglikelihoods(model, tokenizer, requests, groups=groups, progress=progress, **batch))
    hits = {m: np.zeros(len(examples)) for m in METRICS}
    samples = []
    for i, ex in enumerate(examples):
        got = [next(scores) for _ in ex.requests]
        lls = np.array([s.logprob for s in got])
        hits["acc"][i] = np.argmax(lls) == ex.gold
        hits["acc_norm"][i] = np.argmax(lls / np.array(ex.norm_lengths)) == ex.gold
        if log_samples:
            samples.append({"doc_id": i, "target": ex.gold, "arguments": [list(r) for r in ex.requests],
                            "loglikelihoods": lls.tolist(), "n_tokens": [s.n_tokens for s in got],
                            "is_greedy": [s.greedy for s in got],
                            **{m: int(hits[m][i]) for m in METRICS}})
    metrics = {"alias": task, "samples": len(examples)}
    for m in METRICS:
        metrics[f"{m},none"] = float(hits[m].mean())
        metrics[f"{m}_stderr,none"] = _mean_stderr(hits[m])
    return metrics, samples


def _macro_average(per_task: dict[str, dict]) -> dict:
    average = {"alias": "average (macro over tasks)", "tasks": list(per_task)}
    for m in METRICS:
        average[f"{m},none"] = float(np.mean([r[f"{m},none"] for r in per_task.values()]))
        errors = [r[f"{m}_stderr,none"] for r in per_task.values()]
        average[f"{m}_stderr,none"] = (None if None in errors
                                       else math.sqrt(sum(e * e for e in errors)) / len(errors))
    return average


def evaluate(model, tokenizer, tasks: str | list[str] | None = "all", *, limit: int | None = None,
             batch_size: int = 64, max_batch_tokens: int = 2048, ppl_data: str | Path | None = None,
             ppl_context: int | None = None, ppl_stride: int | None = None, log_samples: bool = False,
             progress: bool = False, model_name: str | None = None) -> dict:
    """Evaluate ``model`` zero-shot on ``tasks`` (``"all"``, a comma list or a list; None for none) and, when
    ``ppl_data`` is given, its perplexity there (see ``depthlab.eval.heldout.perplexity``).

    limit: score only the first ``limit`` examples of each task (file order; a fixed subset, so runs compare).
    batch_size, max_batch_tokens: at most this many rows and padded tokens per forward pass.
    log_samples: include each example's log-likelihoods under ``"samples"``.
    Returns lm-eval's layout: ``results[task]["acc,none"]`` etc., the macro average under ``groups["average"]``.
    """
    if tokenizer is None:
        raise EvalError("the model has no tokenizer; evaluation needs one to encode the prompts")
    names = resolve_tasks(tasks) if tasks is not None else []
    if not names and ppl_data is None:
        raise EvalError("nothing to evaluate: give tasks and/or perplexity data")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be a positive number of examples, got {limit}")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        per_task, samples, counts = {}, {}, {}
        for name in names:
            batch = {"batch_size": batch_size, "max_tokens": max_batch_tokens}
            per_task[name], samples[name] = _score_task(model, tokenizer, name, limit, batch, log_samples, progress)
            counts[name] = {"original": _count_documents(name), "effective": per_task[name].pop("samples")}
        ppl = None if ppl_data is None else perplexity(model, tokenizer, source=ppl_data, context_length=ppl_context,
                                                       stride=ppl_stride, progress=progress)
    finally:
        model.train(was_training)
    param = next(model.parameters())
    out = {
        "results": per_task,
        "groups": {"average": _macro_average(per_task)} if per_task else {},
        "n-samples": counts,
        "config": {"model": model_name or type(model).__name__, "model_class": type(model).__name__,
                   "weights_sha256": weights_hash(model),
                   "dtype": str(param.dtype).removeprefix("torch."), "device": str(model_device(model)),
                   "batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "limit": limit, "num_fewshot": 0},
        "depthlab_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_evaluation_time_seconds": round(time.perf_counter() - start, 3),
    }
    if ppl is not None:
        out["perplexity"] = ppl
    if log_samples:
        out["samples"] = samples
    return out


def save_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` (and ``samples_<task>.jsonl`` per task when samples were logged) into ``out_dir``,
    each atomically; returns the results.json path."""
    from depthlab.fileio import atomic_write_text

    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"cannot create output folder {out}: {e.strerror or e}") from None
    body = {k: v for k, v in results.items() if k != "samples"}
    for task, rows in results.get("samples", {}).items():
        atomic_write_text(out / f"samples_{task}.jsonl",
                          "".join(json.dumps(r, default=str) + "\n" for r in rows))
    path = out / "results.json"
    atomic_write_text(path, json.dumps(body, indent=2, default=str) + "\n")  # str: lm-eval's config objects
    return path


def format_table(results: dict) -> str:
    """The printed summary: one line per task (and the average), plus perplexity when measured."""
    def cell(value, stderr):
        return f"{100 * value:6.2f} ± {100 * stderr:4.2f}" if stderr is not None else f"{100 * value:6.2f}"

    rows = [("task", "n", "acc (%)", "acc_norm (%)")]
    n_samples = results.get("n-samples", {})
    entries = list(results["results"].items()) + list(results.get("groups", {}).items())
    for name, r in entries:
        n = n_samples.get(name, {}).get("effective", "")
        rows.append((name, str(n), cell(r["acc,none"], r["acc_stderr,none"]),
                     cell(r["acc_norm,none"], r["acc_norm_stderr,none"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows] if len(rows) > 1 else []
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"perplexity {p['perplexity']:.3f}  bits/byte {p['bits_per_byte']:.4f}  nll {p['nll']:.4f}  "
                     f"({p['tokens']:,} tokens, {p['documents']} documents of {p['source']})")
    return "\n".join(lines)
