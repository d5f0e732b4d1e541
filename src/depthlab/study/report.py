"""Aggregating a study folder into one table row per setting, and rendering it as HTML and Markdown.

`aggregate` reads only files: each run's ``run.json``, ``metrics.jsonl``, ``layer_stats.jsonl``,
``eval/results.json`` and ``analysis/results.json``; so it works on any folder with that layout, finished or not.
Only finished runs (``done.json``) enter the table and figures; the others are listed with their state.

Table values per run: PPL = the held-out perplexity measured after training when the study asked for it, else the
training run's final validation perplexity; usefulness, causal and permutation = the analysis scores (SPEC §5.4–5.5);
avg acc = macro-average downstream accuracy in points; last-layer var = out_var of the last block at the last logged
step (raw stream, before the final norm). A setting with several seeds shows mean ± sample standard deviation.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from depthlab.errors import StudyError
from depthlab.fileio import atomic_write_text
from depthlab.study import figures
from depthlab.study.paper import KNOB_LABELS, REFERENCES, paper_numbers
from depthlab.study.runner import list_runs, read_json, run_state

COLUMNS = (("ppl", "PPL", ".2f"), ("usefulness", "usefulness", ".3f"), ("causal", "causal", ".3f"),
           ("permutation", "permutation", ".3f"), ("avg_acc", "avg acc (%)", ".1f"),
           ("last_var", "last-layer var", ".4g"))
"""(metric key, column title, number format) of the study table, run values and paper values alike."""


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


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report needs from one run folder (missing files give missing values, never errors)."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json") or {}
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    stats = _read_jsonl(run_dir / "layer_stats.jsonl")
    evaluation = read_json(run_dir / "eval" / "results.json") or {}
    analysis = (read_json(run_dir / "analysis" / "results.json") or {}).get("metrics", {})
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
    for key, metric, field in (("usefulness", "usefulness", "score"), ("causal", "causal", "mean_effect"),
                               ("permutation", "permutation", "mean_score")):
        if metric in analysis and analysis[metric].get(field) is not None:
            values[key] = analysis[metric][field]
    jacobian = analysis.get("jacobian", {}).get("layers")
    if stats:
        values["last_var"] = stats[-1]["layers"][-1]["out_var"]
    return {
        "name": run_dir.name, "state": run_state(run_dir), "label": info.get("label", run_dir.name),
        "setting": info.get("setting", {}), "seed": info.get("seed"), "config": info.get("config", {}),
        "values": values, "steps": [s["step"] for s in stats],
        "last_var_curve": [s["layers"][-1]["out_var"] for s in stats],
        "profile": [layer["out_var"] for layer in stats[-1]["layers"]] if stats else [],
        "jacobian_profile": [layer["jacobian_norm"] for layer in jacobian] if jacobian else [],
        "error": (read_json(run_dir / "failed.json") or {}).get("error"),
    }


def _summary(values: list[float]) -> dict[str, float | int | None] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(study_dir: str | Path) -> dict[str, Any]:
    """The study's spec, every run's record, and one row per setting over its finished seeds."""
    study_dir = Path(study_dir)
    folders = list_runs(study_dir)
    spec = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
    runs = [read_run(f) for f in folders]
    reference = spec.get("reference")
    rows: dict[str, dict] = {}
    for run in runs:
        if run["state"] != "done":
            continue
        row = rows.setdefault(run["label"], {
            "label": run["label"], "setting": run["setting"], "runs": [], "seeds": [],
            "paper": paper_numbers(reference, run["config"], run["label"]) if run["config"] else {},
            "var_steps": run["steps"], "var_curves": [], "profiles": [], "jacobian_profiles": []})
        row["runs"].append(run)
        row["seeds"].append(run["seed"])
        if run["last_var_curve"]:
            row["var_curves"].append(run["last_var_curve"])
        if run["profile"]:
            row["profiles"].append(run["profile"])
        if run["jacobian_profile"]:
            row["jacobian_profiles"].append(run["jacobian_profile"])
    for row in rows.values():
        keys = {k for run in row["runs"] for k in run["values"]}
        row["metrics"] = {k: s for k in sorted(keys)
                          if (s := _summary([run["values"].get(k) for run in row["runs"]])) is not None}
        if len(row["var_steps"]) > min((len(c) for c in row["var_curves"]), default=0):
            row["var_steps"] = row["var_steps"][:min(len(c) for c in row["var_curves"])]
    knobs = spec.get("knobs") or []
    return {"study_dir": str(study_dir), "spec": spec, "runs": runs, "rows": list(rows.values()),
            "knobs": knobs, "reference": reference}


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def _cell(summary: dict | None, fmt: str) -> str:
    if not summary:
        return "—"
    text = format(summary["mean"], fmt)
    if summary.get("std") is not None:
        text += f" ± {format(summary['std'], fmt)}"
    return text


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
                     *(_cell(r["metrics"].get(k), d) for k, _, d in run_cols),
                     *(_paper_cell(r["paper"].get(k), d) for k, _, d in paper_cols)])
    return header, body


def build_figures(agg: dict) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) of every figure the study's data supports, in report order."""
    rows, knobs = agg["rows"], agg["knobs"]
    knob_list = knobs if len(knobs) == 1 else [None]
    candidates = [
        ("variance_vs_step", "Last-layer variance vs training step per setting (log y; band = seed range).",
         figures.variance_vs_step(rows)),
        ("variance_profile", "Per-layer variance profile at the end of training (log y).",
         figures.variance_profile(rows)),
        ("jacobian_profile", "Per-layer ||J − I||_F / d per setting.", figures.jacobian_profile(rows)),
    ]
    for knob in knob_list:
        stem = (knob or "setting").replace(".", "_")
        caption = f"Usefulness, causal effect and permutation score vs {knob or 'setting'}."
        candidates.append((f"analysis_vs_{stem}", caption, figures.analysis_vs_knob(rows, knob)))
        candidates.append((f"ppl_usefulness_vs_{stem}", f"Perplexity and usefulness vs {knob or 'setting'}.",
                           figures.ppl_usefulness_vs_knob(rows, knob)))
    candidates.append(("accuracy_bars", "Average downstream accuracy (bars) with usefulness (markers).",
                       figures.accuracy_bars(rows)))
    return [(stem, caption, png) for stem, caption, png in candidates if png is not None]


def _status_rows(agg: dict) -> list[list[str]]:
    return [[run["name"], run["state"], run["error"] or ""] for run in agg["runs"]]


def _title(agg: dict) -> str:
    spec = agg["spec"]
    return f"depthlab study: {spec.get('name', '?')}" + (f" ({spec['scale']} scale)" if spec.get("scale") else "")


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
            lines.append(f"'paper' columns: the numbers of Muhtar et al. (arXiv 2603.15389, SPEC §8) for the same "
                         f"{knob}, from ~0.4–1B models trained on 5B tokens; they show the trend to compare with, "
                         "not values a small run should reach.")
        else:
            rows = ", ".join(str(k) for k in REFERENCES[agg["reference"]])
            lines.append(f"No setting here is one of the paper's rows ({knob} = {rows}; SPEC §8), so no paper "
                         "column is shown.")
    done = sum(run["state"] == "done" for run in agg["runs"])
    lines.append(f"{done} of {len(agg['runs'])} runs finished; unfinished runs are left out of the table and figures.")
    return lines


def render_markdown(agg: dict, figure_files: list[tuple[str, str]]) -> str:
    """The Markdown summary; `figure_files` are (relative path, caption) of the figures written beside it."""
    def md_row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    header, body = table(agg)
    out = [f"# {_title(agg)}", "", *[line + "\n" for line in _intro(agg)], "## Results", "", md_row(header),
           md_row(["---"] * len(header)), *(md_row(r) for r in body), ""]
    if figure_files:
        out += ["## Figures", ""]
        for path, caption in figure_files:
            out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    out += ["## Runs", "", md_row(["run", "state", "error"]), md_row(["---"] * 3),
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
             f'<body data-figures-expected="{len(figure_pngs)}">', f"<h1>{esc(_title(agg))}</h1>",
             *(f"<p>{esc(line)}</p>" for line in _intro(agg)),
             "<h2>Results</h2>", html_table(header, body, "results")]
    if figure_pngs:
        parts.append("<h2>Figures</h2>")
        for stem, caption, png in figure_pngs:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure id="fig-{esc(stem)}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts += ["<h2>Runs</h2>", html_table(["run", "state", "error"], _status_rows(agg), "runs"),
              "<h2>Spec</h2>", f"<pre>{esc(yaml.safe_dump(agg['spec'], sort_keys=False, allow_unicode=True))}</pre>",
              f"<script>{HTML_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(study_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into `out`
    (default STUDY/report); returns the HTML and Markdown paths."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").exists():
        raise StudyError(f"{study_dir} is not a study folder (no study.yaml)")
    out = Path(out) if out is not None else study_dir / "report"
    agg = aggregate(study_dir)
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
