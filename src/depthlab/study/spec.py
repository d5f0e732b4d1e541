"""Study specs: a base config, a grid of overrides, seeds and the measurements to take after training.

A spec is YAML (a file, or a built-in name from ``depthlab/studies/``):

    name: depth
    reference: depth            # which of the paper's tables (SPEC §8) to show beside the results
    base: tiny                  # a preset name or a config YAML path (optional)
    config: {trainer: {max_steps: 600}}   # inline overrides of the base (nested or dotted keys)
    grid: {model.n_layers: [2, 4, 8]}     # cartesian product of dotted config keys ...
    runs: [{name: a, model.n_layers: 2}]  # ... or an explicit list of runs (one of the two)
    seeds: [0, 1]
    measure: {eval_tasks: [arc_easy], eval_limit: 100, perplexity: false,
              analysis: [variance, usefulness], analysis_samples: 16, analysis_seq_len: 128,
              dynamics: [0.25, 0.5], dynamics_analysis: [variance, usefulness]}
    gpu_hours: 4                # expected GPU-hours of the whole study (descriptive, for GPU scales)

A built-in file holds the common keys at the top and one section per scale under ``scales:``; the chosen scale's
keys replace the top-level ones (``config`` and ``measure`` are merged key by key). Resolution turns a spec into
its runs, each a complete, validated Config, so every mistake surfaces before anything trains.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from depthlab import config as cfgmod
from depthlab.errors import AnalysisError, ConfigError, EvalError, StudyError

SPEC_KEYS = ("name", "description", "reference", "runtime", "gpu_hours", "base", "config", "grid", "runs", "seeds",
             "measure")
SPEC_TYPES = {"name": (str, int), "description": str, "reference": str, "runtime": str, "base": str,
              "config": dict, "grid": dict, "runs": list, "measure": dict}
"""The type of each top-level spec key (seeds and gpu_hours are checked with their values)."""
_TYPE_WORDS = {str: "string", dict: "mapping", list: "list", (str, int): "string"}
MEASURE_KEYS = ("eval_tasks", "eval_limit", "perplexity", "analysis", "analysis_samples", "analysis_seq_len",
                "fit_samples", "fit_seq_len", "analysis_options", "dynamics", "dynamics_analysis")
_SHORT = {"model.n_layers": "L", "model.d_model": "d", "optimizer.weight_decay": "wd", "model.seq_len": "T",
          "model.n_kv_heads": "kv", "model.moe.num_experts": "E", "model.moe.top_k": "k", "optimizer.lr": "lr"}
"""Short names of common knobs in generated run names (others use the key's last component)."""


@dataclass
class Measurements:
    """What is measured on each run after training (all optional; the training metrics are always there)."""

    eval_tasks: list[str] = field(default_factory=list)
    """Zero-shot downstream tasks (depthlab.eval names); empty = none."""
    eval_limit: int | None = None
    """Examples per task (the first N of each file), None = all."""
    perplexity: bool = False
    """Also measure held-out perplexity with depthlab.eval (else the table shows the training run's val PPL)."""
    analysis: list[str] = field(default_factory=list)
    """depthlab.analysis metric names (variance, usefulness, causal, permutation, jacobian, ...)."""
    analysis_samples: int = 16
    """Calibration sequences for the analysis."""
    analysis_seq_len: int = 128
    """Tokens per calibration sequence."""
    fit_samples: int | None = None
    """Sequences of the separate sample the usefulness maps are fitted on; None = the analysis default, enough for
    32·(d+1) tokens per map (docs/metrics.md), so every study's usefulness comes from a determined fit."""
    fit_seq_len: int | None = None
    """Tokens per fit sequence; None = analysis_seq_len."""
    analysis_options: dict[str, dict] = field(default_factory=dict)
    """Per-metric options, e.g. {permutation: {pairs: all}}."""
    dynamics: list[float] = field(default_factory=list)
    """Fractions of training (0 < f < 1) at which the checkpoint of step round(f·max_steps) is analysed too, so the
    report can plot the metrics against the training step; the trainer must keep those checkpoints."""
    dynamics_analysis: list[str] = field(default_factory=lambda: ["variance", "usefulness"])
    """The analysis metrics measured at the `dynamics` checkpoints (the end of training gets `analysis`)."""


@dataclass
class Run:
    """One run of a study: its folder name, its overrides and the complete config they give."""

    name: str
    label: str
    """The setting's name (the run name without its seed suffix): runs with the same label are seed replicas."""
    setting: dict[str, Any]
    """The knob values that define the setting (the grid point or explicit entry), seed excluded."""
    seed: int
    config: dict[str, Any]
    """The full resolved config as a nested dict (what the run trains with)."""


@dataclass
class StudySpec:
    name: str
    base: str | None
    config: dict[str, Any]
    grid: dict[str, list] | None
    runs: list[dict] | None
    seeds: list[int]
    measure: Measurements
    reference: str | None = None
    description: str = ""
    runtime: str = ""
    gpu_hours: float | None = None
    """Expected GPU-hours of the whole study (GPU scales), as `depthlab study list` states it."""
    scale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as written to ``study.yaml``: everything that determines the study's results."""
        out = asdict(self)
        out["measure"] = asdict(self.measure)
        out["knobs"] = self.knobs
        return out

    @property
    def knobs(self) -> list[str]:
        """The keys that vary between settings, in spec order."""
        if self.grid is not None:
            return [k for k, v in self.grid.items() if len(v) > 1] or list(self.grid)
        keys = list(dict.fromkeys(k for entry in self.runs for k in entry if k != "name"))
        varying = [k for k in keys if len({repr(entry.get(k, "(base)")) for entry in self.runs}) > 1]
        return varying or keys

    def resolve(self) -> list[Run]:
        """Every (setting, seed) as a Run with a validated config; names are unique and safe as folder names."""
        settings = _grid_settings(self.grid) if self.grid is not None else [dict(e) for e in self.runs]
        runs, seen = [], set()
        for setting in settings:
            label = setting.pop("name", None)
            base_name = str(label) if label is not None else _setting_name(setting)
            for seed in self.seeds:
                name = base_name if len(self.seeds) == 1 else f"{base_name}__s{seed}"
                _check_run_name(name)
                if name in seen:
                    raise StudyError(f"two runs of study '{self.name}' are both named '{name}'")
                seen.add(name)
                config = self._run_config(setting, seed, name)
                runs.append(Run(name, base_name, setting, seed, config))
        return runs

    def _run_config(self, setting: dict[str, Any], seed: int, name: str) -> dict[str, Any]:
        overrides = {**_flatten(self.config), **setting, "trainer.seed": seed}
        try:
            cfg = cfgmod.load_config(self.base, overrides)
        except ConfigError as e:
            raise StudyError(f"run '{name}' of study '{self.name}': {e}") from None
        return cfg.to_dict()


def _grid_settings(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _setting_name(setting: dict[str, Any]) -> str:
    parts = [f"{_SHORT.get(k, k.rsplit('.', 1)[-1])}{_format_value(v)}" for k, v in setting.items()]
    return "_".join(parts) or "base"


def _check_run_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise StudyError(f"run name {name!r} cannot be a folder name (no '/', '\\', leading '.', or empty)")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (and already-dotted keys) → dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating specs


def _studies_dir():
    """The built-in specs: package data of depthlab (``depthlab/studies/*.yaml``, not a Python package)."""
    return resources.files("depthlab") / "studies"


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _studies_dir().iterdir() if p.name.endswith(".yaml"))


def _builtin_path(name: str) -> Path:
    return Path(str(_studies_dir() / f"{name}.yaml"))


def builtin_scales(name: str) -> dict[str, dict[str, Any]]:
    """{scale: {"runtime": text, "gpu_hours": number or None}} of a built-in study."""
    data = yaml.safe_load(_builtin_path(name).read_text())
    return {scale: {"runtime": section.get("runtime", ""), "gpu_hours": section.get("gpu_hours")}
            for scale, section in data.get("scales", {}).items()}


def load_spec(source: str | Path | dict, scale: str | None = None) -> StudySpec:
    """A built-in name, a YAML path or a dict → validated StudySpec (at `scale` when the spec has scales)."""
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), "spec"
    else:
        path = Path(source)
        if not path.suffix and not path.exists():
            names = builtin_names()
            if str(source) not in names:
                raise StudyError(f"unknown study '{source}': give a spec .yaml or one of {', '.join(names)}")
            path = _builtin_path(str(source))
        try:
            data = cfgmod.read_yaml(path)
        except ConfigError as e:
            raise StudyError(str(e)) from None
        where = str(path)
    return parse_spec(data, scale, where)


def parse_spec(data: dict[str, Any], scale: str | None = None, where: str = "spec") -> StudySpec:
    data = dict(data)
    scales = data.pop("scales", None)
    if scales is not None:
        if not isinstance(scales, dict) or not scales:
            raise StudyError(f"{where}: 'scales' must map scale names to sections")
        scale = scale or ("tiny" if "tiny" in scales else next(iter(scales)))
        if scale not in scales:
            raise StudyError(f"{where}: no scale '{scale}'; available: {', '.join(scales)}")
        if not isinstance(scales[scale] or {}, dict):
            raise StudyError(f"{where}: scale section '{scale}' must be a mapping, got "
                             f"{type(scales[scale]).__name__}")
        section = dict(scales[scale] or {})
        if "config" in section:
            section["config"] = {**_flatten(data.get("config") or {}), **_flatten(section["config"] or {})}
        if "measure" in section:
            section["measure"] = {**(data.get("measure") or {}), **(section["measure"] or {})}
        data.update(section)
    elif scale is not None:
        raise StudyError(f"{where} has no scales: drop --scale")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise StudyError(f"{where}: unknown spec key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SPEC_KEYS)}")
    if "name" not in data:
        raise StudyError(f"{where}: the spec needs a 'name'")
    for key, kind in SPEC_TYPES.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise StudyError(f"{where}: '{key}' must be a {_TYPE_WORDS[kind]}, got {type(value).__name__} "
                             f"{value!r}"[:200])
    grid, runs = data.get("grid"), data.get("runs")
    if (grid is None) == (runs is None):
        raise StudyError(f"{where}: give exactly one of 'grid' (cartesian product) or 'runs' (explicit list)")
    valid = set(cfgmod.all_keys())
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise StudyError(f"{where}: the grid is empty: give at least one config key with a list of values")
        grid = {str(k): (v if isinstance(v, list) else [v]) for k, v in grid.items()}
        bad = [k for k in grid if k not in valid]
        if bad:
            raise StudyError(f"{where}: grid keys that are not config keys: {', '.join(bad)} "
                             "(use dotted keys such as model.n_layers; see 'depthlab config keys')")
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise StudyError(f"{where}: grid key(s) with no values: {', '.join(empty)}")
    else:
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise StudyError(f"{where}: 'runs' must be a non-empty list of mappings of config keys")
        runs = [_flatten(r) for r in runs]
        bad = sorted({k for r in runs for k in r if k != "name" and k not in valid})
        if bad:
            raise StudyError(f"{where}: run keys that are not config keys: {', '.join(bad)}")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise StudyError(f"{where}: 'config' must be a mapping of config keys")
    config = _flatten(config)
    bad = [k for k in config if k not in valid]
    if bad:
        raise StudyError(f"{where}: config keys that are not config keys: {', '.join(bad)}")
    seeds = data.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where}: duplicate seeds {seeds}")
    measure = _parse_measure(data.get("measure") or {}, where)
    name = str(data["name"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"{where}: study name {name!r} may only hold letters, digits, '_', '.', '-'")
    gpu_hours = data.get("gpu_hours")
    if gpu_hours is not None and (isinstance(gpu_hours, bool) or not isinstance(gpu_hours, (int, float))
                                  or gpu_hours <= 0):
        raise StudyError(f"{where}: 'gpu_hours' must be a positive number, got {gpu_hours!r}")
    spec = StudySpec(name=name, base=data.get("base"), config=config, grid=grid, runs=runs, seeds=seeds,
                     measure=measure, reference=data.get("reference"), description=str(data.get("description", "")),
                     runtime=str(data.get("runtime", "")), gpu_hours=gpu_hours, scale=scale)
    if spec.reference is not None:
        from depthlab.study.paper import REFERENCES

        if spec.reference not in REFERENCES:
            raise StudyError(f"{where}: unknown reference '{spec.reference}'; one of {', '.join(REFERENCES)}")
    check_dynamics(spec, where)  # resolves every run: each config must be valid now, not hours later
    return spec


def _parse_measure(data: dict[str, Any], where: str) -> Measurements:
    unknown = [k for k in data if k not in MEASURE_KEYS]
    if unknown:
        raise StudyError(f"{where}: unknown measure key(s) {', '.join(unknown)}; valid: {', '.join(MEASURE_KEYS)}")
    m = Measurements(**data)
    if not isinstance(m.analysis_options, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in m.analysis_options.items()):
        raise StudyError(f"{where}: measure.analysis_options must map metric names to mappings of options, got "
                         f"{m.analysis_options!r}"[:200])
    from depthlab.analysis.suite import resolve_options

    try:
        resolve_options(m.analysis_options)
    except AnalysisError as e:
        raise StudyError(f"{where}: measure.analysis_options: {e}") from None
    if isinstance(m.eval_tasks, str):
        m.eval_tasks = [t.strip() for t in m.eval_tasks.split(",") if t.strip()]
    for key in ("analysis", "dynamics_analysis"):
        if isinstance(getattr(m, key), str):
            setattr(m, key, [t.strip() for t in getattr(m, key).split(",") if t.strip()])
    if m.eval_tasks:
        from depthlab.eval.tasks import resolve_tasks

        try:
            m.eval_tasks = resolve_tasks(m.eval_tasks)
        except EvalError as e:
            raise StudyError(f"{where}: measure.eval_tasks: {e}") from None
    from depthlab.analysis.suite import resolve_metrics

    for key in ("analysis", "dynamics_analysis"):
        if getattr(m, key):
            try:
                setattr(m, key, resolve_metrics(getattr(m, key)))
            except AnalysisError as e:
                raise StudyError(f"{where}: measure.{key}: {e}") from None
    if not isinstance(m.dynamics, list) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in m.dynamics):
        raise StudyError(f"{where}: measure.dynamics must be a list of fractions of training in (0, 1), got "
                         f"{m.dynamics!r}")
    m.dynamics = sorted({float(f) for f in m.dynamics})
    if m.eval_limit is not None and (not isinstance(m.eval_limit, int) or m.eval_limit < 1):
        raise StudyError(f"{where}: measure.eval_limit must be a positive integer or null, got {m.eval_limit!r}")
    for key in ("analysis_samples", "analysis_seq_len", "fit_samples", "fit_seq_len"):
        value = getattr(m, key)
        if (value is not None or key.startswith("analysis")) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise StudyError(f"{where}: measure.{key} must be a positive integer{' or null' * key.startswith('fit')}, "
                             f"got {value!r}")
    return m


def dynamics_steps(fractions: list[float], max_steps: int) -> list[int]:
    """The training steps whose checkpoints are analysed besides the last: round(f·max_steps) for each fraction f,
    distinct, each in [1, max_steps)."""
    return sorted({min(max_steps - 1, max(1, round(f * max_steps))) for f in fractions} - {0})


def checkpoint_kept(trainer: dict[str, Any], step: int) -> bool:
    """Whether the trainer (a resolved ``trainer`` section) still has the checkpoint of `step` when training ends.

    It saves every `save_interval` steps (and at the end) and keeps the newest `keep_last` plus every multiple of
    `keep_every`: a step is kept when it is saved and either a multiple of keep_every or among the last keep_last.
    """
    interval, every = trainer["save_interval"], trainer.get("keep_every", 0)
    if not interval or step % interval:
        return False
    later = len(range(step, trainer["max_steps"], interval))  # saved checkpoints from `step` on, the final excluded
    return bool(every and step % every == 0) or later + 1 <= trainer["keep_last"]


def check_dynamics(spec: StudySpec, where: str = "spec") -> None:
    """Every run resolves, and keeps a checkpoint at each of its `dynamics_steps` until training ends."""
    for run in spec.resolve():
        t = run.config["trainer"]
        wanted = dynamics_steps(spec.measure.dynamics, t["max_steps"])
        lost = [step for step in wanted if not checkpoint_kept(t, step)]
        if lost:
            raise StudyError(
                f"{where}: run '{run.name}' analyses the checkpoints of steps {wanted} (measure.dynamics "
                f"{spec.measure.dynamics} of {t['max_steps']} steps), but the trainer would not keep {lost}: make "
                f"trainer.save_interval (now {t['save_interval']}) and trainer.keep_every (now "
                f"{t.get('keep_every', 0)}) divide each")


def spec_difference(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys where two recorded specs differ, as 'key: old → new' (empty when equal)."""
    a, b = _flatten_all(recorded), _flatten_all(current)
    return [f"{k}: {a.get(k, '(absent)')!r} → {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def _flatten_all(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten_all(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten_all(v, f"{prefix}{i}."))
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): d}
