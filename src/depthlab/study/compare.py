"""`compare_runs`: two run folders side by side — config difference, final losses, per-layer variance, analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from depthlab import config as cfgmod
from depthlab.errors import StudyError
from depthlab.study.report import read_run
from depthlab.study.runner import read_json

SUMMARY_KEYS = ("usefulness_score", "effective_depth", "causal_mean_effect", "permutation_mean_score")


def compare_runs(a: str | Path, b: str | Path) -> dict[str, Any]:
    """What differs between runs `a` and `b` and how they ended: a dict that `format_comparison` prints."""
    paths = [Path(a), Path(b)]
    for path in paths:
        if not (path / "config.yaml").exists():
            raise StudyError(f"{path} is not a run folder (no config.yaml)")
    configs = [cfgmod.read_yaml(p / "config.yaml") for p in paths]
    records = [read_run(p) for p in paths]
    summaries = [(read_json(p / "analysis" / "results.json") or {}).get("summary", {}) for p in paths]
    final = {key: [r["values"].get(key) for r in records]
             for key in ("train_loss", "val_loss", "ppl", "avg_acc", "usefulness", "causal", "permutation",
                         "last_var")}
    return {"runs": [str(p) for p in paths], "config_diff": cfgmod.diff(configs[0], configs[1]),
            "final": {k: v for k, v in final.items() if any(x is not None for x in v)},
            "steps": [r["steps"][-1] if r["steps"] else None for r in records],
            "variance": [r["profile"] for r in records],
            "analysis": {k: [s.get(k) for s in summaries] for k in SUMMARY_KEYS if any(k in s for s in summaries)}}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_comparison(c: dict[str, Any], markdown: bool = False) -> str:
    """Plain text (aligned columns) or Markdown (tables) of a comparison."""
    a, b = c["runs"]
    sections: list[tuple[str, list[list[str]]]] = [
        ("config difference", [["key", "A → B"]] + ([d.split(": ", 1) for d in c["config_diff"]]
                                                    or [["(none: same config)", ""]])),
        ("final values", [["", "A", "B"]] + [[k, _fmt(va), _fmt(vb)] for k, (va, vb) in c["final"].items()]),
        ("per-layer variance (last logged step" + (f" {c['steps'][0]} / {c['steps'][1]})" if any(c["steps"])
                                                   else ")"),
         [["block", "A", "B"]] + [[str(i), _fmt(_at(c["variance"][0], i)), _fmt(_at(c["variance"][1], i))]
                                   for i in range(max(map(len, c["variance"])))]),
        ("analysis", [["", "A", "B"]] + [[k, _fmt(va), _fmt(vb)] for k, (va, vb) in c["analysis"].items()]),
    ]
    lines = [f"# Comparison\n\nA: `{a}`  \nB: `{b}`\n" if markdown else f"A: {a}\nB: {b}"]
    for title, rows in sections:
        if len(rows) < 2:
            continue
        if markdown:
            lines += [f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
                      *("| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows[1:]), ""]
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines += ["", title] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                                    for r in rows]
    return "\n".join(lines) + "\n"


def _at(values: list, i: int):
    return values[i] if i < len(values) else None
