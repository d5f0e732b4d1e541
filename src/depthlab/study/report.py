"""Aggregating a study folder into one table row per setting, and rendering it as HTML and Markdown.

`aggregate` reads only files: each run's ``run.json``, ``metrics.jsonl``, ``layer_stats.jsonl``,
``eval/results.json`` and ``analysis/results.json``; so it works on any folder with that layout, finished or not.
Only finished runs (``done.json``) enter the table and figures; the others are listed with their state.
`analysis` names another folder of each run to read the analysis from instead, e.g. a re-analysis with
``depthlab analyze RUN --out RUN/NAME`` on a different sample; the training-dynamics checkpoints, measured on the
study's own sample, are then left out so that no curve mixes two samples.

Table values per run: val loss = the training run's final validation loss (nats/token); PPL = the held-out
perplexity measured after training when the study asked for it, else exp(val loss); usefulness, causal and
permutation = the analysis scores (SPEC §5.4–5.5); mean log ratio = the threshold-free usefulness
mean_l log(L_l / L_0); avg acc = macro-average downstream accuracy in points; last-layer var = out_var of the last
block at the last logged step (raw stream, before the final norm). A setting with several seeds shows mean ± the
half-width of the 95% Student-t interval of the mean.

Each report opens with the claims of the paper that its study tests (`depthlab.study.claims`), and marks what
undermines a number: a usefulness from an under-determined fit (†) and a run whose validation loss is not below the
add-one bigram baseline on the same validation windows (‡, `depthlab.study.baselines`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from depthlab.errors import StudyError
from depthlab.fileio import atomic_write_text
from depthlab.rundir import RunDir
from depthlab.study import claims, figures
from depthlab.study.paper import KNOB_LABELS, REFERENCES, paper_numbers
from depthlab.study.runner import ANALYSIS_DIR, list_runs, read_json, run_state

COLUMNS = (("val_loss", "val loss", ".3f"), ("ppl", "PPL", ".2f"), ("usefulness", "usefulness", ".3f"),
           ("continuous_usefulness", "mean log ratio", ".4f"), ("causal", "causal", ".3f"),
           ("permutation", "permutation", ".3f"), ("avg_acc", "avg acc (%)", ".1f"),
           ("last_var", "last-layer var", ".4g"))
"""(metric key, column title, number format) of the study table, run values and paper values alike."""
UNRELIABLE, BELOW_BIGRAM = "†", "‡"
RELIABLE_TOKENS_PER_COEFFICIENT = 10
"""A usefulness fit is under-determined below 10·(d+1) fit tokens per map (the usefulness issue's rule); used for
results written before analyses recorded their own `reliable` flag."""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
    return out


def read_run(run_dir: str | Path, analysis: str = ANALYSIS_DIR) -> dict[str, Any]:
    """Everything the report needs from one run folder (missing files give missing values, never errors), with the
    analysis read from its folder `analysis`."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json") or {}
    metrics = _read_jsonl(RunDir(run_dir).metrics_path)
    stats = _read_jsonl(RunDir(run_dir).layer_stats_path)
    evaluation = read_json(run_dir / "eval" / "results.json") or {}
    analysis_results = read_json(run_dir / analysis / "results.json") or {}
    analysed = analysis_results.get("metrics", {})
    values: dict[str, float] = {}
    train_lines = [m for m in metrics if "loss" in m]
    val_lines = [m for m in metrics if "val_loss" in m]
    if train_lines:
        values["train_loss"] = train_lines[-1]["loss"]
    if val_lines:
        values["val_loss"] = val_lines[-1]["val_loss"]
        values["ppl"] = val_lines[-1]["val_ppl"]
    if "perplexity" in evaluation:
        values["ppl"] = evaluation["perplexity"]["perplexity"]
    average = evaluation.get("groups", {}).get("average")
    if average:
        values["avg_acc"] = 100 * average["acc,none"]
    for key, metric, field in (("usefulness", "usefulness", "score"),
                               ("continuous_usefulness", "usefulness", "continuous_score"),
                               ("causal", "causal", "mean_effect"), ("permutation", "permutation", "mean_score")):
        if metric in analysed and analysed[metric].get(field) is not None:
            values[key] = analysed[metric][field]
    jacobian = analysed.get("jacobian", {}).get("layers")
    if stats:
        values["last_var"] = stats[-1]["layers"][-1]["out_var"]
    baselines = read_json(run_dir / "baselines.json") or {}
    done = read_json(run_dir / "done.json") or {}
    final_step = (info.get("config") or {}).get("trainer", {}).get("max_steps")
    return {
        "name": run_dir.name, "state": run_state(run_dir), "label": info.get("label", run_dir.name),
        "setting": info.get("setting", {}), "seed": info.get("seed"), "config": info.get("config", {}),
        "values": values, "steps": [s["step"] for s in stats],
        "last_var_curve": [s["layers"][-1]["out_var"] for s in stats],
        "profile": [layer["out_var"] for layer in stats[-1]["layers"]] if stats else [],
        "jacobian_profile": [layer["jacobian_norm"] for layer in jacobian] if jacobian else [],
        "reliable": {"usefulness": usefulness_reliable(analysis_results)},
        "baselines": baselines,
        "beats_bigram": (values["val_loss"] < baselines["bigram"]) if "bigram" in baselines and "val_loss" in values
        else None,
        "dynamics": _dynamics(run_dir, final_step, analysis_results) if analysis == ANALYSIS_DIR else [],
        "analysis_sample": _sample(analysis_results),
        "seconds": done.get("seconds"), "load_average": done.get("load_average"),
        "error": (read_json(run_dir / "failed.json") or {}).get("error"),
    }


def _sample(results: dict) -> tuple[int, int] | None:
    """(sequences, tokens per sequence) an analysis was evaluated on, from its results.json."""
    settings = results.get("settings", {})
    return (settings["num_samples"], settings["seq_len"]) if "num_samples" in settings and "seq_len" in settings \
        else None


def usefulness_reliable(results: dict) -> bool:
    """Whether an analysis' usefulness comes from a determined fit: its own `reliable` flag, or (for results that
    predate it) whether the tokens it was fitted on reach 10·(d+1); True when there is no usefulness."""
    usefulness = results.get("metrics", {}).get("usefulness")
    if usefulness is None:
        return True
    if "reliable" in usefulness:
        return bool(usefulness["reliable"])
    settings, model = results.get("settings", {}), results.get("model", {})
    if not settings or not model.get("d_model"):
        return True  # nothing to judge by (hand-written results)
    tokens = settings.get("num_samples", 0) * settings.get("seq_len", 0)
    return tokens >= RELIABLE_TOKENS_PER_COEFFICIENT * (model["d_model"] + 1)


DYNAMICS_METRICS = (("usefulness", "usefulness", "score"), ("continuous_usefulness", "usefulness",
                                                             "continuous_score"))
"""(value key, analysis metric, field) read at every analysed checkpoint."""


def _dynamics(run_dir: Path, final_step: int | None, final: dict) -> list[dict[str, Any]]:
    """[{step, usefulness, continuous_usefulness, reliable}] at every analysed checkpoint and the end, by step."""
    points = []
    for folder in sorted((run_dir / "dynamics").glob("step_*")):
        results = read_json(folder / "results.json")
        if results is not None and folder.name[5:].isdigit():
            points.append((int(folder.name[5:]), results))
    if final.get("metrics") and final_step is not None:
        points.append((final_step, final))
    out = []
    for step, results in points:
        metrics = results.get("metrics", {})
        entry = {"step": step, "reliable": usefulness_reliable(results)}
        for key, metric, field in DYNAMICS_METRICS:
            if metrics.get(metric, {}).get(field) is not None:
                entry[key] = metrics[metric][field]
        out.append(entry)
    return out


def _summary(values: list[float]) -> dict[str, float | int | None] | None:
    """Mean, sample standard deviation and 95% t-interval half-width (`half`) over seeds."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    mean, half = claims.mean_interval(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else None, "half": half,
            "n": len(values)}


def aggregate(study_dir: str | Path, analysis: str = ANALYSIS_DIR) -> dict[str, Any]:
    """The study's spec, every run's record (its analysis read from the run's folder `analysis`), and one row per
    setting over its finished seeds."""
    study_dir = Path(study_dir)
    folders = list_runs(study_dir)
    spec = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
    runs = [read_run(f, analysis) for f in folders]
    reference = spec.get("reference")
    rows: dict[str, dict] = {}
    for run in runs:
        if run["state"] != "done":
            continue
        row = rows.setdefault(run["label"], {
            "label": run["label"], "setting": run["setting"], "runs": [], "seeds": [],
            "paper": paper_numbers(reference, run["config"], run["label"]) if run["config"] else {},
            "var_steps": run["steps"], "var_curves": [], "profiles": [], "jacobian_profiles": [],
            "dynamics": []})
        row["runs"].append(run)
        row["seeds"].append(run["seed"])
        if run["last_var_curve"]:
            row["var_curves"].append(run["last_var_curve"])
        if run["profile"]:
            row["profiles"].append(run["profile"])
        if run["jacobian_profile"]:
            row["jacobian_profiles"].append(run["jacobian_profile"])
        if run["dynamics"]:
            row["dynamics"].append(run["dynamics"])
    for row in rows.values():
        row["unreliable"] = sum(1 for run in row["runs"] if not run["reliable"]["usefulness"])
        row["below_bigram"] = sum(1 for run in row["runs"] if run["beats_bigram"] is False)
        keys = {k for run in row["runs"] for k in run["values"]}
        row["metrics"] = {k: s for k in sorted(keys)
                          if (s := _summary([run["values"].get(k) for run in row["runs"]])) is not None}
        if len(row["var_steps"]) > min((len(c) for c in row["var_curves"]), default=0):
            row["var_steps"] = row["var_steps"][:min(len(c) for c in row["var_curves"])]
    knobs = spec.get("knobs") or []
    return {"study_dir": str(study_dir), "spec": spec, "runs": runs, "rows": list(rows.values()),
            "knobs": knobs, "reference": reference, "claims": claims.evaluate_study(reference, runs),
            "context": _context(spec, runs), "analysis": analysis}


def _context(spec: dict, runs: list[dict]) -> str:
    """What every figure title says: the model shape, the training length, the analysis sample and the seeds."""
    configs = [r["config"] for r in runs if r["config"]]
    parts = []

    def common(section, key, fmt):
        values = {c.get(section, {}).get(key) for c in configs}
        return fmt.format(values.pop()) if len(values) == 1 and None not in values else None

    for section, key, fmt in (("model", "d_model", "d={}"), ("model", "n_layers", "L={}"), ("model", "seq_len", "T={}"),
                              ("trainer", "max_steps", "{} steps"), ("trainer", "batch_size", "batch {}")):
        if (text := common(section, key, fmt)) is not None:
            parts.append(text)
    if (sample := _analysis_context(spec, [r for r in runs if r["state"] == "done"])) is not None:
        parts.append(sample)
    seeds = spec.get("seeds") or []
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}")
    return ", ".join(parts)


def _analysis_context(spec: dict, runs: list[dict]) -> str | None:
    """The analysis sample as the finished runs' results record it (the spec's when none does): one N×T for all,
    or, for a re-analysis at each run's own context length, the tokens per run."""
    samples = {r["analysis_sample"] for r in runs if r["analysis_sample"]}
    if not samples:
        measure = spec.get("measure") or {}
        return f"analysis {measure['analysis_samples']}×{measure['analysis_seq_len']} tokens" if measure.get(
            "analysis") else None
    if len(samples) == 1:
        n, t = samples.pop()
        return f"analysis {n}×{t} tokens"
    tokens = {n * t for n, t in samples}
    own = all(r["analysis_sample"][1] == r["config"].get("model", {}).get("seq_len") for r in runs
              if r["analysis_sample"])
    where = "each run's own T" if own else "T " + "/".join(str(t) for t in sorted({t for _, t in samples}))
    amount = f"{tokens.pop()} tokens" if len(tokens) == 1 else "varying tokens"
    return f"analysis at {where}, {amount} per run"


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def _cell(summary: dict | None, fmt: str, mark: str = "") -> str:
    if not summary:
        return "—"
    text = format(summary["mean"], fmt)
    if summary.get("half") is not None:
        text += f" ± {format(summary['half'], fmt)}"
    return text + (f" {mark}" if mark else "")


def _mark(row: dict, key: str) -> str:
    if key in ("usefulness", "continuous_usefulness") and row["unreliable"]:
        return UNRELIABLE
    if key == "val_loss" and row["below_bigram"]:
        return BELOW_BIGRAM
    return ""


def _paper_cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(agg: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the study table: run metrics that any setting has, then the paper's matching numbers."""
    rows = agg["rows"]
    run_cols = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in rows)]
    paper_cols = [c for c in COLUMNS if any(c[0] in r["paper"] for r in rows)]
    header = ["setting", "seeds", *(title for _, title, _ in run_cols),
              *(f"paper {title}" for _, title, _ in paper_cols)]
    body = []
    for r in rows:
        body.append([r["label"], str(len(r["seeds"])),
                     *(_cell(r["metrics"].get(k), d, _mark(r, k)) for k, _, d in run_cols),
                     *(_paper_cell(r["paper"].get(k), d) for k, _, d in paper_cols)])
    return header, body


def build_figures(agg: dict) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) of every figure the study's data supports, in report order."""
    rows, knobs, context = agg["rows"], agg["knobs"], agg["context"]
    knob = knobs[0] if len(knobs) == 1 else None
    stem = (knob or "setting").replace(".", "_")
    band = "band = 95% interval over seeds"
    candidates = [
        ("variance_vs_step", f"Last-layer variance vs training step per setting (log y; {band}).",
         figures.variance_vs_step(rows, context)),
        ("usefulness_vs_step", f"Usefulness and mean log loss ratio at the analysed checkpoints ({band}).",
         figures.usefulness_vs_step(rows, context)),
        ("variance_profile", "Per-layer variance at the end of training (log y; error bars = 95% interval).",
         figures.variance_profile(rows, context)),
        ("jacobian_profile", "Per-layer ‖J − I‖_F / d at the end of training (error bars = 95% interval).",
         figures.jacobian_profile(rows, context)),
        (f"analysis_vs_{stem}", (f"Usefulness, causal effect and permutation score vs {knob or 'setting'} "
         "(error bars = 95% interval)."), figures.analysis_vs_knob(rows, knob, context)),
        (f"ppl_usefulness_vs_{stem}", (f"Perplexity, usefulness and mean log loss ratio vs {knob or 'setting'} "
                                       "(error bars = 95% interval)."),
         figures.ppl_usefulness_vs_knob(rows, knob, context)),
        ("accuracy_bars", "Average downstream accuracy (bars) and usefulness per setting (95% intervals).",
         figures.accuracy_bars(rows, context)),
    ]
    return [(stem, caption, png) for stem, caption, png in candidates if png is not None]


STATUS_HEADER = ("run", "state", "val loss", "bigram CE", "beats bigram", "wall (s)", "load avg (start → end)",
                 "error")


def _status_rows(agg: dict) -> list[list[str]]:
    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    def load(run):
        la = run["load_average"]
        if not la:
            return "—"
        return " → ".join(f"{v[0]:.2f}" if v else "?" for v in (la.get("start"), la.get("end")))

    def error(run):  # the study folder is not part of a checked-in report: name it, do not cite its path
        text = run["error"] or ""
        for prefix in {str(Path(agg["study_dir"]).resolve()), agg["study_dir"]}:
            text = text.replace(prefix, "STUDY")
        return text

    return [[run["name"], run["state"], fmt(run["values"].get("val_loss"), ".3f"),
             fmt(run["baselines"].get("bigram"), ".3f"),
             {True: "yes", False: f"NO {BELOW_BIGRAM}", None: "—"}[run["beats_bigram"]], fmt(run["seconds"], ".0f"),
             load(run), error(run)] for run in agg["runs"]]


def _baselines_line(agg: dict) -> str | None:
    found = [run["baselines"] for run in agg["runs"] if run["baselines"]]
    if not found:
        return None

    def span(key):
        lo, hi = min(b[key] for b in found), max(b[key] for b in found)
        return f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}–{hi:.3f}"

    return (f"Baselines on the same validation windows as 'val loss' (fitted on the training split): unigram "
            f"{span('unigram')} and add-one bigram {span('bigram')} nats/token. {BELOW_BIGRAM} marks a setting with a "
            "run whose validation loss is not below the bigram's: such a model has learnt nothing beyond token "
            "pairs.")


def _claims_table(agg: dict) -> tuple[tuple[str, ...], list[list[str]]] | None:
    if not agg["claims"]:
        return None
    return claims.CLAIM_HEADER, claims.claim_rows(agg["reference"], agg["claims"])


def _title(agg: dict) -> str:
    spec = agg["spec"]
    scale = f" ({spec['scale']} scale)" if spec.get("scale") else ""
    other = f", analysis from {agg['analysis']}/" if agg["analysis"] != ANALYSIS_DIR else ""
    return f"depthlab study: {spec.get('name', '?')}{scale}{other}"


def _intro(agg: dict) -> list[str]:
    spec = agg["spec"]
    lines = []
    if spec.get("description"):
        lines.append(str(spec["description"]))
    lines.append(f"Knob(s): {', '.join(agg['knobs']) or '—'}; seeds {spec.get('seeds')}; base "
                 f"{spec.get('base') or 'defaults'}. Expected runtime: {spec.get('runtime') or 'not stated'}.")
    if agg["reference"]:
        knob = KNOB_LABELS.get(agg["reference"], "setting")
        if any(row["paper"] for row in agg["rows"]):
            lines.append(f"'paper' columns: the numbers of Muhtar et al. (arXiv 2603.15389; depthlab.study.paper) for "
                         f"the same {knob}, from ~0.4–1B models trained on 5B tokens; they show the trend to compare "
                         "with, not values a small run should reach.")
        else:
            rows = ", ".join(str(k) for k in REFERENCES[agg["reference"]])
            lines.append(f"No setting here is one of the paper's rows ({knob} = {rows}; depthlab.study.paper), so no "
                         "paper column is shown.")
    done = sum(run["state"] == "done" for run in agg["runs"])
    lines.append(f"{done} of {len(agg['runs'])} runs finished; unfinished runs are left out of the table and figures.")
    if agg["analysis"] != ANALYSIS_DIR:
        lines.append(f"The analysis metrics are read from each run's {agg['analysis']}/ folder, a re-analysis of the "
                     "trained model, not from the study's own analysis; the training-dynamics figure, measured on "
                     "the study's sample, is left out.")
    if (baselines := _baselines_line(agg)) is not None:
        lines.append(baselines)
    if any(row["unreliable"] for row in agg["rows"]):
        lines.append(f"{UNRELIABLE} marks a usefulness from an under-determined fit (fewer than 10·(d+1) fit tokens "
                     "per map): do not read it as a property of the model.")
    return lines


def md_escape(text) -> str:
    """A user string as literal Markdown text: HTML-escaped as in the HTML page (a renderer passes raw HTML through),
    Markdown's inline markup characters backslash-escaped, and on one line."""
    text = html.escape(str(text), quote=False).replace("\n", " ").replace("\r", " ")
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def render_markdown(agg: dict, figure_files: list[tuple[str, str]]) -> str:
    """The Markdown summary; `figure_files` are (relative path, caption) of the figures written beside it. Every
    user-provided string goes through `md_escape`."""
    def md_row(cells):
        return "| " + " | ".join(md_escape(c) for c in cells) + " |"

    header, body = table(agg)
    out = [f"# {md_escape(_title(agg))}", ""]
    if (claim_table := _claims_table(agg)) is not None:
        out += ["## Claims", "", md_row(claim_table[0]), md_row(["---"] * len(claim_table[0])),
                *(md_row(r) for r in claim_table[1]), "", claims.RULE, ""]
    out += [*[md_escape(line) + "\n" for line in _intro(agg)], "## Results", "", md_row(header),
            md_row(["---"] * len(header)), *(md_row(r) for r in body), ""]
    if figure_files:
        out += ["## Figures", ""]
        for path, caption in figure_files:
            out += [f"![{md_escape(caption)}]({path})", "", f"*{md_escape(caption)}*", ""]
    out += ["## Runs", "", md_row(STATUS_HEADER), md_row(["---"] * len(STATUS_HEADER)),
            *(md_row(r) for r in _status_rows(agg)), ""]
    return "\n".join(out)


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}pre{background:#f7f7f7;padding:1em;
overflow:auto;font-size:12px}.failed{color:#b00}"""

# Marks <body data-figures-loaded="N"> once every <img> decoded (naturalWidth > 0), or data-figures-failed otherwise:
# a headless browser's DOM dump then shows whether all figures rendered.
HTML_SCRIPT = """(function(){function check(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);});
if(bad.length){document.body.setAttribute('data-figures-failed',String(bad.length));}
else{document.body.setAttribute('data-figures-loaded',String(imgs.length));}}
if(document.readyState==='complete'){check();}else{window.addEventListener('load',check);}})();"""


def render_html(agg: dict, figure_pngs: list[tuple[str, str, bytes]]) -> str:
    """One self-contained HTML page: figures embedded as base64 PNG, every user-provided string escaped."""
    esc = html.escape

    def html_table(header, body, css_id):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
        return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'

    header, body = table(agg)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(_title(agg))}</title><style>{HTML_STYLE}</style></head>",
             f'<body data-figures-expected="{len(figure_pngs)}">', f"<h1>{esc(_title(agg))}</h1>"]
    if (claim_table := _claims_table(agg)) is not None:
        parts += ["<h2>Claims</h2>", html_table(*claim_table, "claims"), f"<p>{esc(claims.RULE)}</p>"]
    parts += [*(f"<p>{esc(line)}</p>" for line in _intro(agg)), "<h2>Results</h2>", html_table(header, body, "results")]
    if figure_pngs:
        parts.append("<h2>Figures</h2>")
        for stem, caption, png in figure_pngs:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure id="fig-{esc(stem)}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts += ["<h2>Runs</h2>", html_table(STATUS_HEADER, _status_rows(agg), "runs"),
              "<h2>Spec</h2>", f"<pre>{esc(yaml.safe_dump(agg['spec'], sort_keys=False, allow_unicode=True))}</pre>",
              f"<script>{HTML_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(study_dir: str | Path, out: str | Path | None = None,
                 analysis: str = ANALYSIS_DIR) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into `out`
    (default STUDY/report), the analysis read from each run's folder `analysis`; returns the HTML and Markdown
    paths."""
    study_dir = Path(study_dir)
    _check_study(study_dir, analysis)
    out = Path(out) if out is not None else study_dir / "report"
    return _write(aggregate(study_dir, analysis), out)


def _check_study(study_dir: Path, analysis: str) -> None:
    if not (study_dir / "study.yaml").exists():
        raise StudyError(f"{study_dir} is not a study folder (no study.yaml)")
    if analysis != ANALYSIS_DIR:
        if not analysis or analysis in (".", "..") or "/" in analysis or "\\" in analysis:
            raise StudyError(f"--analysis {analysis!r} must be the name of a folder inside each run folder")
        if not any((run / analysis / "results.json").exists() for run in list_runs(study_dir)):
            raise StudyError(f"no run of {study_dir} has {analysis}/results.json (write one with 'depthlab "
                             f"analyze RUN --out RUN/{analysis}')")


def _write(agg: dict, out: Path) -> tuple[Path, Path]:
    pngs = build_figures(agg)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for stem, _, png in pngs:
        tmp = out / "figures" / f".{stem}.png.tmp"
        tmp.write_bytes(png)
        tmp.replace(out / "figures" / f"{stem}.png")
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(agg, pngs))
    atomic_write_text(md_path, render_markdown(agg, [(f"figures/{stem}.png", caption) for stem, caption, _ in pngs]))
    return html_path, md_path


# ----------------------------------------------------------------------------------------------------------------
# Several studies: one claims table


def _wall_summary(agg: dict) -> str:
    done = [run for run in agg["runs"] if run["state"] == "done" and run["seconds"] is not None]
    if not done:
        return "—"
    loads = [la["end"][1] for run in done if (la := run["load_average"]) and la.get("end")]
    text = f"{sum(run['seconds'] for run in done) / 60:.0f} min over {len(done)} runs"
    return text + (f", 5-min load {min(loads):.1f}–{max(loads):.1f}" if loads else "")


def render_combined(aggs: list[dict], reports: list[Path | None], where: Path) -> str:
    """The combined claims table (Markdown) of several studies; `reports` are their report.md files (or None),
    linked relative to the folder `where` the table is written to, and only when they exist."""
    def md_row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    header = ("study", *claims.CLAIM_HEADER)
    out = ["# depthlab: the paper's claims at study scale", "",
           ("Each row is one claim of Muhtar et al. (arXiv 2603.15389) that a built-in study tests, with the study's "
           "estimate across seeds and its verdict. Generated by `depthlab report ... --combined` from the study "
           "folders; every number comes from the linked reports."), "", claims.RULE, "",
           md_row(header), md_row(["---"] * len(header))]
    for agg, report in zip(aggs, reports):
        name = _title(agg).removeprefix("depthlab study: ")
        if report is not None and report.exists():
            name = f"[{name}]({Path(os.path.relpath(report.resolve(), where.resolve())).as_posix()})"
        rows = claims.claim_rows(agg["reference"], agg["claims"]) if agg["claims"] else [
            ["(no claims: the study has no paper reference)", "—", "—", "—", "—"]]
        out += [md_row([name, *row]) for row in rows]
    out += ["", "## Studies", "", md_row(("study", "runs finished", "wall time and load", "figures' context")),
            md_row(["---"] * 4)]
    for agg in aggs:
        done = sum(run["state"] == "done" for run in agg["runs"])
        out.append(md_row([_title(agg).removeprefix("depthlab study: "), f"{done}/{len(agg['runs'])}",
                           _wall_summary(agg), agg["context"]]))
    return "\n".join(out) + "\n"


def write_reports(study_dirs: list[str | Path], out: str | Path | None = None,
                  combined: str | Path | None = None, analysis: str = ANALYSIS_DIR) -> list[Path]:
    """Write each study's report (one study: into `out`; several: into ``out/<study folder name>``, default each
    STUDY/report) and, with `combined`, the combined claims table there; the analysis is read from each run's
    folder `analysis`. Returns the files written."""
    dirs = [Path(d) for d in study_dirs]
    for d in dirs:
        _check_study(d, analysis)
    written, aggs, reports = [], [], []
    for d in dirs:
        target = d / "report" if out is None else Path(out) if len(dirs) == 1 else Path(out) / d.name
        aggs.append(aggregate(d, analysis))
        html_path, md_path = _write(aggs[-1], target)
        written += [html_path, md_path]
        reports.append(md_path)
    if combined is not None:
        combined = Path(combined)
        combined.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(combined, render_combined(aggs, reports, combined.parent))
        written.append(combined)
    return written
