"""The paper's claims that each study tests, the study's estimate of each effect across seeds, and a verdict.

A claim is an effect with the paper's sign (SPEC §8), estimated from the finished runs of a study in one of two ways:

* **trend** — the least-squares slope of the metric against log₂ of the knob (per doubling of L, T or G), over every
  run (each seed one point); 95% interval from Student's t with n − 2 degrees of freedom.
* **contrast** — mean(metric at setting B) − mean(metric at setting A) over seeds; 95% Welch interval (Student's t
  with Welch–Satterthwaite degrees of freedom).

Variance and perplexity are compared on the log scale, so their effects read as ratios (×1.7 per doubling).

Verdict rule, the same for every claim: the 95% interval excludes 0 → **reproduced** when the estimate has the
paper's sign, **not reproduced** when it has the opposite sign; the interval includes 0, there are too few runs for
an interval, or a usefulness value involved comes from an under-determined fit (``reliable: false``) →
**inconclusive**. The paper's own numbers are shown when both ends of the comparison are settings of the paper's
table, else the paper's direction (with its numbers at its own settings, labelled so).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

from depthlab.study.paper import KNOB_LABELS, REFERENCES, row_key

LOG_METRICS = ("last_var", "ppl")
"""Metrics whose effects are estimated on the log scale (reported as ratios)."""

THRESHOLD_FREE = "continuous_usefulness"
"""mean_l log(L_l / L_0): usefulness without the 10% threshold. Each usefulness claim is also tested on it, because
a small model's loss ratios can all sit below 1.1 (usefulness 0 in every setting) while still differing."""


def t_quantile(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    return float(scipy_stats.t.ppf(0.975, df))


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% t-interval) over seeds; the half-width is None for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def welch(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean(b) − mean(a), half-width of its 95% Welch interval); None when either side has < 2 values."""
    effect = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return effect, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return effect, 0.0
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return effect, t_quantile(df) * math.sqrt(se2)


def slope(xs: list[float], ys: list[float]) -> tuple[float, float | None]:
    """(least-squares slope of ys on xs, half-width of its 95% interval); None with < 3 points or 1 distinct x."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan, None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return b, None
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return b, t_quantile(n - 2) * math.sqrt(residual / (n - 2) / sxx)


# ----------------------------------------------------------------------------------------------------------------
# The claims


Select = Callable[[Any, list[Any]], bool]
"""(a run's row key, all row keys of the study) → whether the run is on this side of a contrast."""


def at(value: Any) -> Select:
    return lambda key, keys: key == value


def extreme(which: str) -> Select:
    """The smallest ("min") or largest ("max") numeric row key of the study."""
    pick = min if which == "min" else max

    def select(key, keys):
        numbers = [k for k in keys if isinstance(k, (int, float))]
        return bool(numbers) and key == pick(numbers)
    return select


def named(*names: str) -> Select:
    """A named setting (MoE and recipe rows): the setting name starts with one of `names`."""
    return lambda key, keys: any(str(key).startswith(n) for n in names)


@dataclass(frozen=True)
class Claim:
    study: str
    """The reference study (a key of REFERENCES) whose runs test the claim."""
    text: str
    metric: str
    """A row metric key (usefulness, continuous_usefulness, last_var, ppl, causal, permutation, avg_acc)."""
    direction: int
    """The paper's sign of the effect: +1 (B above A, or rising with the knob) or −1."""
    kind: str = "trend"
    """trend (slope per doubling of the knob) or contrast (B − A)."""
    a: Select | None = None
    b: Select | None = None
    paper_a: Any = None
    """The paper's row key for side A (contrasts) or the first of the paper's settings (trends)."""
    paper_b: Any = None


_PAPER_CLAIMS = (
    Claim("depth", "last-layer variance grows with depth", "last_var", +1, paper_a=12, paper_b=32),
    Claim("depth", "usefulness falls with depth", "usefulness", -1, paper_a=12, paper_b=32),
    Claim("depth", "the causal effect of a block falls with depth", "causal", -1, paper_a=12, paper_b=32),
    Claim("depth", "the permutation score falls with depth", "permutation", -1, paper_a=12, paper_b=32),
    Claim("weight_decay", "moderate weight decay (λ 0 → 0.1) raises usefulness", "usefulness", +1, "contrast",
          at(0.0), at(0.1), 0.0, 0.1),
    Claim("weight_decay", "too much weight decay (λ 0.1 → max) lowers usefulness", "usefulness", -1, "contrast",
          at(0.1), extreme("max"), 0.1, 3.0),
    Claim("weight_decay", "moderate weight decay (λ 0 → 0.1) lowers PPL", "ppl", -1, "contrast", at(0.0), at(0.1),
          0.0, 0.1),
    Claim("weight_decay", "too much weight decay (λ 0.1 → max) raises PPL", "ppl", +1, "contrast", at(0.1),
          extreme("max"), 0.1, 3.0),
    Claim("weight_decay", "weight decay (λ 0 → max) lowers last-layer variance", "last_var", -1, "contrast",
          at(0.0), extreme("max")),
    Claim("context", "longer context raises usefulness", "usefulness", +1, paper_a=256, paper_b=2048),
    Claim("context", "longer context lowers PPL", "ppl", -1, paper_a=256, paper_b=2048),
    Claim("gqa", "key/value sharing (G 1 → max) raises usefulness", "usefulness", +1, "contrast", at(1),
          extreme("max"), 1, 16),
    Claim("gqa", "key/value sharing (G 1 → max) lowers PPL slightly", "ppl", -1, "contrast", at(1), extreme("max"),
          1, 16),
    Claim("moe", "MoE raises usefulness over dense at matched active parameters", "usefulness", +1, "contrast",
          named("dense"), named("moe"), "dense-1b", "moe-7b-1b"),
    Claim("moe", "MoE lowers PPL at matched active parameters", "ppl", -1, "contrast", named("dense"), named("moe"),
          "dense-1b", "moe-7b-1b"),
    Claim("recipe", "the recipe beats the baseline at equal depth (avg accuracy)", "avg_acc", +1, "contrast",
          named("baseline"), named("+moe"), "baseline", "+moe"),
    Claim("recipe", "the recipe at 2L beats the L-layer reference (avg accuracy)", "avg_acc", +1, "contrast",
          named("half-depth"), named("+moe"), "half-depth", "+moe"),
    Claim("recipe", "doubling depth alone lowers avg accuracy (baseline 2L vs the L reference)", "avg_acc", -1,
          "contrast", named("half-depth"), named("baseline"), "half-depth", "baseline"),
    Claim("recipe", "the recipe raises usefulness over the baseline at equal depth", "usefulness", +1, "contrast",
          named("baseline"), named("+moe")),
)
CLAIMS: tuple[Claim, ...] = tuple(c for claim in _PAPER_CLAIMS for c in (claim, *(
    [Claim(claim.study, f"{claim.text} (threshold-free: mean log loss ratio)", THRESHOLD_FREE, claim.direction,
           claim.kind, claim.a, claim.b)] if claim.metric == "usefulness" else [])))
"""Every claim, by study, each usefulness claim followed by its threshold-free twin (the paper's direction, no paper
numbers). Contrast sides select runs by the paper's row key of their config (paper.row_key)."""


# ----------------------------------------------------------------------------------------------------------------
# Evaluating the claims on a study


def _log2(value: Any) -> float | None:
    return math.log2(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def evaluate_claim(claim: Claim, runs: list[dict]) -> dict[str, Any]:
    """The claim's estimate on `runs` (finished run records from `report.read_run`) with its verdict."""
    log = claim.metric in LOG_METRICS
    points = []  # (row key, value, reliable)
    for run in runs:
        value = run["values"].get(claim.metric)
        if value is None or not math.isfinite(value) or (log and value <= 0) or not run["config"]:
            continue
        reliable = claim.metric not in ("usefulness", THRESHOLD_FREE) or run["reliable"].get("usefulness", True)
        points.append((row_key(claim.study, run["config"], run["label"]), math.log(value) if log else value,
                       reliable))
    keys = list({p[0]: None for p in points})
    out: dict[str, Any] = {"claim": claim.text, "metric": claim.metric, "kind": claim.kind, "log": log,
                           "direction": claim.direction, "effect": None, "half": None, "n": 0, "settings": None}
    if claim.kind == "trend":
        used = [(x, v, r) for k, v, r in points if (x := _log2(k)) is not None]
        if len({x for x, _, _ in used}) >= 2:
            out["effect"], out["half"] = slope([x for x, _, _ in used], [v for _, v, _ in used])
        keys_used = sorted({k for k, _, _ in points if _log2(k) is not None})
        out["settings"] = (keys_used[0], keys_used[-1]) if keys_used else None
    else:
        side_a = [p for p in points if claim.a(p[0], keys)]
        keys_a = {p[0] for p in side_a}
        side_b = [p for p in points if claim.b(p[0], keys) and p[0] not in keys_a]
        used = side_a + side_b
        if side_a and side_b:
            out["effect"], out["half"] = welch([v for _, v, _ in side_a], [v for _, v, _ in side_b])
            out["settings"] = (side_a[0][0], side_b[0][0])
    out["n"] = len(used)
    out["unreliable"] = sum(1 for p in used if not p[-1])
    out["verdict"], out["why"] = verdict(out["effect"], out["half"], claim.direction, out["unreliable"])
    if out["verdict"] == "inconclusive" and len(used) >= 2 and len({v for _, v, _ in used}) == 1:
        # No variation at all is not a noisy null: say what every run gave (usually no block past the threshold).
        value = math.exp(used[0][1]) if log else used[0][1]
        out["why"] = ("usefulness is 0 in every run: no block passes the threshold" if
                      claim.metric == "usefulness" and value == 0 else f"every run gives {_number(value)}")
    out["paper"] = paper_effect(claim, out["settings"])
    return out


def verdict(effect: float | None, half: float | None, direction: int, unreliable: int = 0) -> tuple[str, str]:
    """(reproduced | not reproduced | inconclusive, the reason) by the module's rule."""
    if effect is None or not math.isfinite(effect):
        return "inconclusive", "no runs on one side"
    if unreliable:
        return "inconclusive", f"{unreliable} usefulness value(s) from an under-determined fit"
    if half is None:
        return "inconclusive", "too few runs for an interval"
    if abs(effect) <= half:
        return "inconclusive", "the 95% interval includes 0"
    same = (effect > 0) == (direction > 0)
    return ("reproduced", "the 95% interval excludes 0, paper's sign") if same else (
        "not reproduced", "the 95% interval excludes 0, opposite sign")


def paper_effect(claim: Claim, settings: tuple | None) -> dict[str, Any]:
    """The paper's numbers for the claim: `matched` when the study compared the paper's own settings."""
    table = REFERENCES[claim.study]
    out: dict[str, Any] = {"direction": claim.direction, "matched": False, "a": claim.paper_a, "b": claim.paper_b}
    values = [table.get(k, {}).get(claim.metric) for k in (claim.paper_a, claim.paper_b)]
    if None not in values:
        out["values"] = values
    if settings is not None and claim.kind == "contrast" and tuple(settings) == (claim.paper_a, claim.paper_b):
        out["matched"] = "values" in out
    return out


def evaluate_study(reference: str | None, runs: list[dict]) -> list[dict[str, Any]]:
    """Every claim of the reference study, evaluated on its finished runs (empty without a reference)."""
    done = [r for r in runs if r["state"] == "done"]
    return [evaluate_claim(c, done) for c in CLAIMS if c.study == reference]


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def _number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def format_result(result: dict[str, Any], knob: str = "") -> str:
    """The estimate as text: '+0.12 [0.05, 0.19]' (a ratio '×1.7 [1.4, 2.1]' on the log scale) and its unit."""
    effect, half = result["effect"], result["half"]
    if effect is None or not math.isfinite(effect):
        return "—"
    unit = f" per doubling of {knob}" if result["kind"] == "trend" else ""
    if result["log"]:
        text = f"×{_number(math.exp(effect))}"
        if half is not None:
            text += f" [{_number(math.exp(effect - half))}, {_number(math.exp(effect + half))}]"
    else:
        text = f"{effect:+.3g}"
        if half is not None:
            text += f" [{effect - half:+.3g}, {effect + half:+.3g}]"
    return text + unit + f" (n={result['n']})"


def _key(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _span(a: Any, b: Any, knob: str) -> str:
    """'λ 0 → 0.1' for knob values, 'dense → moe' for named settings."""
    return f"{knob} {_key(a)} → {_key(b)}" if isinstance(a, (int, float)) else f"{a} → {b}"


def format_settings(result: dict[str, Any], knob: str) -> str:
    return "—" if result["settings"] is None else _span(*result["settings"], knob)


def format_paper(result: dict[str, Any], knob: str) -> str:
    paper = result["paper"]
    arrow = "↑" if paper["direction"] > 0 else "↓"
    if "values" not in paper:
        return arrow
    va, vb = paper["values"]
    numbers = f"{_number(va)} → {_number(vb)}"
    if paper["matched"]:
        return f"{numbers} {arrow}"
    return f"{arrow} (paper at {_span(paper['a'], paper['b'], knob)}: {numbers})"


CLAIM_HEADER = ("claim", "compared", "tiny result: effect [95% interval]", "verdict", "paper")


def claim_rows(reference: str, results: list[dict[str, Any]]) -> list[list[str]]:
    knob = KNOB_LABELS.get(reference, "setting")
    return [[r["claim"], format_settings(r, knob), format_result(r, knob),
             r["verdict"] + (f" ({r['why']})" if r["verdict"] == "inconclusive" else ""), format_paper(r, knob)]
            for r in results]


RULE = ("Verdict rule: an effect whose 95% interval across seeds excludes 0 is *reproduced* when it has the paper's "
        "sign and *not reproduced* when it has the opposite sign; otherwise (interval includes 0, too few runs, or a "
        "usefulness value from an under-determined fit) it is *inconclusive*. Trends are least-squares slopes against "
        "log₂ of the knob over all runs; contrasts are differences of seed means (Welch interval). Variance and PPL "
        "effects are ratios (log scale). 'paper' gives the paper's numbers (depthlab.study.paper) when the compared "
        "settings are the paper's, else its direction, with its numbers at its own settings.")
