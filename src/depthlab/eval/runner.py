"""`evaluate`: downstream scores (and optionally perplexity) of a model, written in lm-evaluation-harness's layout.

Multiple-choice tasks: ``acc`` (the choice with the highest summed log-likelihood is the gold one) and ``acc_norm``
(the same after dividing each log-likelihood by its choice's length in characters, lm-eval's definition).
Generative tasks: ``exact_match`` of the greedy generation (cut at the task's stop strings) against any accepted
answer, after the task's normalisation. Each with the standard error of the mean (sample standard deviation over
examples / sqrt(n), as lm-eval reports it; "N/A" for one example). The ``average`` group weighs every task equally
for each metric the tasks report; its standard error assumes independent tasks, ``sqrt(sum se_i²) / k``.

The result has every top-level key lm-eval 0.4.x writes (``results``, ``groups``, ``group_subtasks``, ``configs``,
``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ``git_hash``, ``date``, environment,
tokenizer and tracker fields), so ``lm_eval.utils.make_table`` and tools that read lm-eval's files read it; each
task's alias names the split that was scored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from depthlab import __version__
from depthlab.errors import EvalError
from depthlab.eval.generation import generate_until
from depthlab.eval.heldout import perplexity
from depthlab.eval.scorer import context_length, loglikelihoods, model_device
from depthlab.eval.tasks import FEWSHOT_SEED, TASKS, count_documents, data_path, load_examples, resolve_tasks
from depthlab.loading import weights_hash
from depthlab.provenance import provenance

GROUP = "average"
NO_STDERR = "N/A"  # what lm-eval writes where a standard error is undefined (one example)


def _mean_stderr(values: np.ndarray) -> float | str:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else NO_STDERR


def _score_choices(model, tokenizer, examples, batch: dict, log_samples: bool, progress: bool):
    requests = [r for ex in examples for r in ex.requests]
    groups = [i for i, ex in enumerate(examples) for _ in ex.requests]  # an example's choices share one row
    scores = iter(loglikelihoods(model, tokenizer, requests, groups=groups, progress=progress, **batch))
    hits = {m: np.zeros(len(examples)) for m in ("acc", "acc_norm")}
    samples = []
    for i, ex in enumerate(examples):
        got = [next(scores) for _ in ex.requests]
        lls = np.array([s.logprob for s in got])
        hits["acc"][i] = np.argmax(lls) == ex.gold
        hits["acc_norm"][i] = np.argmax(lls / np.array(ex.norm_lengths)) == ex.gold
        if log_samples:
            samples.append({"doc_id": i, "target": ex.gold, "arguments": [list(r) for r in ex.requests],
                            "loglikelihoods": lls.tolist(), "n_tokens": [s.n_tokens for s in got],
                            "is_greedy": [s.greedy for s in got], **{m: int(h[i]) for m, h in hits.items()}})
    return hits, samples


def _score_generations(model, tokenizer, task, examples, batch: dict, log_samples: bool, progress: bool):
    gen = task.generation
    # a short-context model (depthlab's tiny preset: 128) gets half its context to generate in; lm-eval refuses it
    max_gen_toks = min(gen.max_gen_toks, context_length(model) // 2)
    outputs = generate_until(model, tokenizer, [q.context for q in examples], until=gen.until,
                             max_gen_toks=max_gen_toks, progress=progress, **batch)
    hits = np.array([gen.metric(out, q.answers) for out, q in zip(outputs, examples)], dtype=float)
    samples = [{"doc_id": i, "target": list(q.answers), "arguments": [q.context], "generation": out,
                "exact_match": int(h)} for i, (q, out, h) in enumerate(zip(examples, outputs, hits))]
    return {"exact_match": hits}, samples if log_samples else []


def _alias(task: str) -> str:
    return f"{task} ({TASKS[task].split})"


def _task_config(task: str, num_fewshot: int) -> dict:
    """The task's definition in lm-eval's ``configs`` layout (the fields that determine its numbers)."""
    t = TASKS[task]
    metric_kwargs = {}
    if t.generation is not None:
        m = t.generation.metric
        metric_kwargs = {"ignore_case": m.ignore_case, "ignore_punctuation": m.ignore_punctuation,
                         "regexes_to_ignore": list(m.regexes_to_ignore)}
    config = {
        "task": task, "dataset_path": str(data_path(task)), "test_split": None, "validation_split": t.split,
        "fewshot_split": t.fewshot_split, "output_type": t.output_type, "target_delimiter": " ",
        "fewshot_delimiter": t.fewshot_delimiter,
        "fewshot_config": {"sampler": "first_n" if t.fewshot_file else "default", "split": t.fewshot_split,
                           **({"path": str(data_path(task, fewshot=True)), "per": t.fewshot_group}
                              if t.fewshot_file else {})},
        "num_fewshot": num_fewshot,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True, **metric_kwargs}
                        for m in t.metrics],
        "repeats": 1,
        "metadata": {"version": t.version, "lm_eval_task_split": t.lmeval_split},
    }
    if t.generation is not None:
        config["generation_kwargs"] = {"until": list(t.generation.until), "do_sample": False, "temperature": 0.0,
                                       "max_gen_toks": t.generation.max_gen_toks}
        config["filter_list"] = [{"name": t.filter, "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}]
    return config


def metric_keys(result: dict) -> list[str]:
    """The ``metric,filter`` keys of one results entry (not the standard errors, alias, ...)."""
    return [k for k in result if "," in k and "_stderr," not in k]


def stderr_key(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return f"{metric}_stderr,{filter_name}"


def _average(per_task: dict[str, dict]) -> dict:
    """The macro average of every metric over the tasks reporting it."""
    out: dict = {"alias": f"{GROUP} (macro over tasks)"}
    for key in dict.fromkeys(k for r in per_task.values() for k in metric_keys(r)):
        rows = [r for r in per_task.values() if key in r]
        out[key] = float(np.mean([r[key] for r in rows]))
        errors = [r.get(stderr_key(key), NO_STDERR) for r in rows]
        out[stderr_key(key)] = (NO_STDERR if any(not isinstance(e, float) for e in errors)
                                else math.sqrt(sum(e * e for e in errors)) / len(errors))
    return out


@functools.cache
def _environment() -> dict:
    """lm-eval's environment fields (``add_env_info``), computed once per process."""
    from importlib.metadata import PackageNotFoundError, version

    from torch.utils.collect_env import get_pretty_env_info

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "N/A"

    return {"pretty_env_info": get_pretty_env_info(), "transformers_version": installed("transformers"),
            "lm_eval_version": installed("lm_eval"), "upper_git_hash": None}


@functools.cache
def _git_hash() -> str | None:
    """The short commit of the depthlab source checkout, when depthlab runs from one (lm-eval's ``git_hash``)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                             check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _tokenizer_fields(tokenizer, max_length: int | None) -> dict:
    def pair(name):
        return [getattr(tokenizer, f"{name}_token", None), str(getattr(tokenizer, f"{name}_token_id", None))]

    return {"tokenizer_pad_token": pair("pad"), "tokenizer_eos_token": pair("eos"), "tokenizer_bos_token": pair("bos"),
            "eot_token_id": tokenizer.eos_token_id, "max_length": max_length}


def _task_hash(samples: list[dict]) -> str:
    return hashlib.sha256("".join(json.dumps([s["arguments"], s["target"]]) for s in samples).encode()).hexdigest()


def evaluate(model, tokenizer, tasks: str | list[str] | None = "all", *, limit: int | None = None,
             num_fewshot: int = 0, fewshot_seed: int = FEWSHOT_SEED, batch_size: int = 64,
             max_batch_tokens: int = 2048, ppl_data: str | Path | None = None, ppl_context: int | None = None,
             ppl_stride: int | None = None, log_samples: bool = False, progress: bool = False,
             model_name: str | None = None) -> dict:
    """Evaluate ``model`` on ``tasks`` (``"all"``, a comma list or a list; None for none) and, when ``ppl_data`` is
    given, its perplexity there (see ``depthlab.eval.heldout.perplexity``).

    limit: score only the first ``limit`` examples of each task (file order; a fixed subset, so runs compare).
    num_fewshot, fewshot_seed: shots per prompt and the seed that chooses them (see ``depthlab.eval.tasks``).
    batch_size, max_batch_tokens: at most this many rows and padded tokens per forward pass.
    log_samples: include each example's log-likelihoods or generation under ``"samples"``.
    Returns lm-eval's layout: ``results[task]["acc,none"]`` etc., the macro average under ``groups["average"]``.
    """
    if tokenizer is None:
        raise EvalError("the model has no tokenizer; evaluation needs one to encode the prompts")
    names = resolve_tasks(tasks) if tasks is not None else []
    if not names and ppl_data is None:
        raise EvalError("nothing to evaluate: give tasks and/or perplexity data")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be a positive number of examples, got {limit}")
    # build every prompt first, so a bad few-shot count fails before any model time is spent
    examples = {name: load_examples(name, limit, num_fewshot, fewshot_seed) for name in names}
    start_date, start = time.time(), time.perf_counter()
    batch = {"batch_size": batch_size, "max_tokens": max_batch_tokens}
    was_training = model.training
    model.eval()
    try:
        per_task, samples = {}, {}
        for name in names:
            task = TASKS[name]
            if task.generation is None:
                hits, samples[name] = _score_choices(model, tokenizer, examples[name], batch, log_samples, progress)
            else:
                hits, samples[name] = _score_generations(model, tokenizer, task, examples[name], batch, log_samples,
                                                         progress)
            per_task[name] = {"name": name, "alias": _alias(name), "sample_len": len(examples[name])}
            for m, h in hits.items():
                per_task[name][f"{m},{task.filter}"] = float(h.mean())
                per_task[name][f"{m}_stderr,{task.filter}"] = _mean_stderr(h)
        ppl = None if ppl_data is None else perplexity(model, tokenizer, source=ppl_data, context_length=ppl_context,
                                                       stride=ppl_stride, progress=progress)
    finally:
        model.train(was_training)
    try:
        max_length = context_length(model)
    except EvalError:
        max_length = None
    param = next(model.parameters())
    groups = {GROUP: _average(per_task)} if per_task else {}
    results = {**per_task, **groups}
    name = model_name or type(model).__name__
    out = {
        "results": results,
        **({"groups": groups} if groups else {}),
        "group_subtasks": {GROUP: names} if groups else {},
        "configs": {n: _task_config(n, num_fewshot) for n in sorted(names)},
        "versions": {n: TASKS[n].version for n in sorted(names)},
        "n-shot": {n: num_fewshot for n in sorted(results)},
        "higher_is_better": {n: {k.split(",")[0]: True for k in metric_keys(r)} for n, r in sorted(results.items())},
        "n-samples": {n: {"original": count_documents(n), "effective": len(examples[n])} for n in names},
        "config": {"model": name, "model_args": None, "model_num_parameters": sum(p.numel() for p in model.parameters()),
                   "model_dtype": str(param.dtype), "model_revision": None, "model_sha": None,
                   "model_class": type(model).__name__, "weights_sha256": weights_hash(model),
                   "batch_size": batch_size, "batch_sizes": [], "max_batch_tokens": max_batch_tokens,
                   "device": str(model_device(model)), "use_cache": None, "limit": limit, "bootstrap_iters": None,
                   "gen_kwargs": None, "random_seed": None, "numpy_seed": None, "torch_seed": None,
                   "fewshot_seed": fewshot_seed, "num_fewshot": num_fewshot},
        "git_hash": _git_hash(),
        "date": start_date,
        **_environment(),
        **_tokenizer_fields(tokenizer, max_length),
        "task_hashes": {n: _task_hash(s) for n, s in samples.items()} if log_samples else {},
        "model_source": "depthlab",
        "model_name": name,
        "model_name_sanitized": re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name),
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": False,
        "chat_template": None,
        "chat_template_sha": None,
        "total_evaluation_time_seconds": str(round(time.perf_counter() - start, 3)),
        "depthlab_version": __version__,
        "provenance": provenance(model),  # depthlab's own block: command, model origin (e.g. GGUF Q4_1, dequantised)
    }
    if ppl is not None:
        out["perplexity"] = ppl
    if log_samples:
        out["samples"] = samples
    return out


def save_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` (and ``samples_<task>.jsonl`` per task when samples were logged) into ``out_dir``,
    each atomically; returns the results.json path."""
    from depthlab.fileio import atomic_write_text, dumps_json

    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"cannot create output folder {out}: {e.strerror or e}") from None
    body = {k: v for k, v in results.items() if k != "samples"}
    for task, rows in results.get("samples", {}).items():
        atomic_write_text(out / f"samples_{task}.jsonl",
                          "".join(dumps_json(r, default=str) + "\n" for r in rows))
    path = out / "results.json"
    atomic_write_text(path, dumps_json(body, indent=2, default=str) + "\n")  # str: lm-eval's config objects
    return path


def format_table(results: dict) -> str:
    """The printed summary: one line per task (its scored split, shots, examples, metrics) and the average, plus
    perplexity when measured."""
    def cell(r, key):
        if key not in r:
            return ""
        value, stderr = r[key], r.get(stderr_key(key))
        return f"{100 * value:6.2f} ± {100 * stderr:4.2f}" if isinstance(stderr, float) else f"{100 * value:6.2f}"

    entries = results["results"]
    metrics = list(dict.fromkeys(k for r in entries.values() for k in metric_keys(r)))
    header = ("task", "split", "shots", "n", *(f"{k.split(',')[0]} (%)" for k in metrics))
    rows = [header]
    n_samples, n_shot = results.get("n-samples", {}), results.get("n-shot", {})
    for name, r in entries.items():
        config = results.get("configs", {}).get(name, {})
        split = config.get("validation_split") or config.get("test_split") or ""  # the bridge's file is its test split
        rows.append((name, split, str(n_shot.get(name, "")), str(n_samples.get(name, {}).get("effective", "")),
                     *(cell(r, k) for k in metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows] if len(rows) > 1 else []
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"perplexity {p['perplexity']:.3f}  bits/byte {p['bits_per_byte']:.4f}  nll {p['nll']:.4f}  "
                     f"({p['tokens']:,} tokens, {p['documents']} documents of {p['source']})")
    return "\n".join(lines)
