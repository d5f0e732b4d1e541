"""Typed run configuration: dataclasses with a docstring under every field, YAML files, presets, dotted overrides.

A config is built in layers: defaults → preset or YAML file → ``--section.key=value`` overrides, then validated.
Every error names the offending key (and, for typos, the closest valid one) in one line.

Every numeric field declares its range (`at_least`, `above`, `between`) and every closed-vocabulary string its
choices (`one_of`) next to its default; `validate` checks all of them, plus finiteness of every float, the int64
range of every int and the cross-field rules (divisibility, MoE), before anything is allocated or written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from depthlab.errors import ConfigError

NORM_PLACEMENTS = ("pre", "post", "mix", "peri")
INT64_MAX = 2**63 - 1
"""The largest int any field accepts (torch seeds, step counters and sizes are int64)."""


@dataclass(frozen=True)
class Bound:
    """The declared valid values of one field: a numeric interval or a set of choices."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple | None = None

    def check(self, key: str, value: Any) -> None:
        if self.choices is not None:
            _check(value in self.choices, f"{key} must be {self.describe()}, got {value!r}")
            return
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and value > self.hi
        _check(not (below or above), f"{key} must be {self.describe()}, got {value}")

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + "|".join(map(str, self.choices))
        if self.hi is not None and self.lo is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"
        if self.lo == 0 and self.lo_open or self.lo == 1 and not self.lo_open:
            return "positive"
        return f"{'>' if self.lo_open else '>='} {self.lo}"


def _bounded(default: Any, bound: Bound) -> Any:
    return field(default=default, metadata={"bound": bound})


def at_least(default: float, lo: float) -> Any:
    return _bounded(default, Bound(lo))


def above(default: float, lo: float) -> Any:
    return _bounded(default, Bound(lo, lo_open=True))


def between(default: float, lo: float, hi: float) -> Any:
    return _bounded(default, Bound(lo, hi))


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    return _bounded(default, Bound(choices=choices))


@dataclass
class MoEConfig:
    num_experts: int = at_least(0, 0)
    """Number of routed experts E per block; 0 means a dense SwiGLU FFN."""
    top_k: int = at_least(2, 1)
    """Experts each token is routed to (k); the expert density is k/E."""
    expert_hidden: int = at_least(0, 0)
    """Hidden size H_e of each expert's SwiGLU; 0 means the dense FFN hidden size."""
    shared_expert_hidden: int = at_least(0, 0)
    """Hidden size of an always-on shared expert; 0 means none."""
    lb_weight: float = at_least(0.01, 0)
    """Weight w_lb of the load-balancing loss (divided by n_layers once)."""
    z_weight: float = at_least(0.001, 0)
    """Weight w_z of the router z-loss (divided by n_layers once)."""
    renormalize: bool = False
    """Renormalise the chosen experts' probabilities to sum to 1."""


@dataclass
class ModelConfig:
    vocab_size: int = at_least(0, 0)
    """Vocabulary size; 0 means take it from the prepared dataset's tokenizer."""
    d_model: int = at_least(128, 1)
    """Width of the residual stream d."""
    n_layers: int = at_least(4, 1)
    """Number of transformer blocks L (depth)."""
    n_heads: int = at_least(4, 1)
    """Number of attention query heads."""
    n_kv_heads: int = at_least(0, 0)
    """Number of key/value heads; 0 means n_heads (multi-head). GQA group size G = n_heads / n_kv_heads."""
    seq_len: int = at_least(128, 1)
    """Context length T used in training (and the RoPE table size)."""
    ffn_hidden: int = at_least(0, 0)
    """SwiGLU hidden size; 0 means 8/3·d_model rounded up to a multiple of 64."""
    norm: str = one_of("pre", NORM_PLACEMENTS)
    """Norm placement: pre | post | mix (Mix-LN) | peri (Peri-LN)."""
    mix_fraction: float = between(0.25, 0, 1)
    """Mix-LN: the first floor(n_layers·mix_fraction) blocks are post-LN, the rest pre-LN."""
    lns: bool = False
    """LayerNorm Scaling: multiply each block's normed input by 1/sqrt(l+1)."""
    norm_eps: float = at_least(1e-6, 0)
    """RMSNorm epsilon."""
    norm_affine: bool = True
    """RMSNorm has a learned per-feature weight."""
    qk_norm: bool = False
    """Apply RMSNorm to queries and keys per head before RoPE."""
    rope_theta: float = above(10000.0, 0)
    """RoPE base frequency."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the LM head."""
    init_std: float = above(0.02, 0)
    """Standard deviation of the normal initialisation of every matrix and embedding."""
    init_scheme: str = one_of("normal", ("normal", "depth_scaled"))
    """normal | depth_scaled (output projections scaled by 1/sqrt(2·n_layers); interacts badly with lns)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts FFN settings."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * -(-(8 * self.d_model) // (3 * 64))


@dataclass
class DataConfig:
    path: str = ""
    """Prepared dataset folder (from `depthlab data prepare`); empty means the bundled Shakespeare corpus, prepared
    on first use into the cache."""
    vocab_size: int = at_least(4096, 256 + 2)
    """BPE vocabulary size when the bundled corpus is prepared automatically."""


@dataclass
class OptimizerConfig:
    lr: float = above(3e-3, 0)
    """Peak learning rate of AdamW."""
    weight_decay: float = at_least(0.1, 0)
    """Decoupled weight decay λ (applied as lr·λ·w per step)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW β1, β2."""
    eps: float = above(1e-8, 0)
    """AdamW epsilon."""
    decay_norms: bool = False
    """Also decay norm weights (and biases, if any)."""
    decay_embeddings: bool = False
    """Also decay the token embedding (and the LM head when tied)."""
    grad_clip: float = at_least(1.0, 0)
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = at_least(50, 0)
    """Linear warmup steps from 0 to the peak learning rate."""
    alpha_f: float = between(0.1, 0, 1)
    """Final learning rate as a fraction of the peak, reached by cosine decay at max_steps."""
    decay_steps: int = at_least(0, 0)
    """Step where the cosine decay reaches alpha_f·lr, which then stays; 0 means trainer.max_steps. Resuming with a
    larger trainer.max_steps sets it to the original max_steps: an extended run keeps its schedule and trains the
    extra steps at the final rate."""


@dataclass
class TrainerConfig:
    max_steps: int = at_least(300, 1)
    """Optimizer steps to train for."""
    batch_size: int = at_least(32, 1)
    """Global batch size in sequences per optimizer step (across all ranks and micro-batches)."""
    micro_batch_size: int = at_least(0, 0)
    """Sequences per forward/backward on one rank; 0 means batch_size / world_size (no accumulation)."""
    eval_interval: int = at_least(100, 0)
    """Steps between validation-loss evaluations (and at the end); 0 disables."""
    eval_batches: int = at_least(8, 1)
    """Validation size in global batches: eval_batches × batch_size fixed windows from the start of the val split."""
    save_interval: int = at_least(100, 0)
    """Steps between checkpoints (and at the end); 0 saves only at the end."""
    keep_last: int = at_least(2, 1)
    """Number of most recent checkpoints to keep."""
    keep_every: int = at_least(0, 0)
    """Also keep every checkpoint whose step is a multiple of this, whatever keep_last says (0: none), e.g. for
    `depthlab analyze RUN --checkpoints all` over training."""
    stats_interval: int = at_least(25, 0)
    """Steps between per-layer statistics lines in layer_stats.jsonl; 0 disables."""
    stats_moments: bool = False
    """Also log skewness, kurtosis and the |z|>3 outlier fraction of the residual stream."""
    stats_grad_norms: bool = False
    """Also log gradient and parameter norms per block."""
    stats_weight_sparsity: bool = False
    """Also log weight sparsity per block and matrix type (SPEC §5.6)."""
    stats_attention: bool = False
    """Also log attention entropy / effective support per layer on a fixed probe batch (SPEC §5.7)."""
    seed: int = at_least(0, 0)
    """Seed of the initialisation and of the data order."""
    dtype: str = one_of("auto", ("auto", "bf16", "fp32"))
    """Autocast dtype: auto (bf16 on GPUs and CPUs with native bf16 units, else fp32) | bf16 | fp32."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    compile: bool = False
    """torch.compile the whole model (inductor; C++ on CPU). Off by default, also on CPU: at the tiny study shapes
    (d128 T128 b32, L 2-16, measured alone on 2 cores) a compiled step is 1.03-1.13x faster than eager, but the
    first compile takes 9-32 s (about 2 min on a loaded machine), which leaves 0.98-1.11x of HF over a 600-step run
    against eager's 1.01-1.03x, and statistics steps compile a second graph on top (their hooks change it)
    (docs/benchmarks.md, benchmarks/train_throughput.py). For long GPU runs (the small preset sets it)."""
    fsdp: bool = False
    """Shard parameters with FSDP2 when running under torchrun."""
    log_interval: int = at_least(10, 1)
    """Steps between lines in metrics.jsonl."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Also write TensorBoard event files when tensorboard is installed."""
    profile_every: int = at_least(10, 0)
    """Draw the per-layer profile figure (``profile/layers`` in TensorBoard / W&B) at every N-th statistics line,
    the first included; 0 never. A figure costs about a second of CPU, more than a tiny model's training step."""
    wandb_project: str = ""
    """Weights & Biases project; empty disables W&B."""
    wandb_mode: str = one_of("offline", ("offline", "online"))
    """W&B mode: offline | online."""
    progress: bool = True
    """Show a live progress line."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings and weight-decay groups."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, batch, checkpoint and statistics settings."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics go besides metrics.jsonl."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ----------------------------------------------------------------------------------------------------------------
# Introspection: field docs and types


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, doc) for every leaf field, in declaration order."""
    rows = []
    types_ = _field_types(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append((key, _type_name(tp), getattr(default, f.name), docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def bound_of(key: str) -> Bound | None:
    """The declared range or choices of a dotted config key (None for free-form fields)."""
    *path, name = key.split(".")
    cls = Config
    for part in path:
        cls = _field_types(cls)[part]
    return next(f.metadata.get("bound") for f in dataclasses.fields(cls) if f.name == name)


def all_keys(cls: type = Config) -> list[str]:
    return [row[0] for row in describe(cls)]


# ----------------------------------------------------------------------------------------------------------------
# Building from dicts, YAML, presets and overrides


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check (and gently convert) a value against a field type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot (3e-4) as strings
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key} must be a finite number, got {_short(value)}") from None
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(key, arg, value)
                except ConfigError:
                    pass
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"a {len(text)}-digit number"


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    cls = type(obj)
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, all_keys(Config) if not prefix else [prefix + n for n in names] + all_keys())
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, tp, value))


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return cfg


def to_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else list(value) if isinstance(
            value, tuple) else value
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = safe_load_unique(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("depthlab.presets").iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; available: {', '.join(names)}")
    return Path(str(resources.files("depthlab.presets") / f"{name}.yaml"))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--model.n_layers=32", "--trainer.seed", "3"]`` → ``{"model.n_layers": 32, "trainer.seed": 3}``.

    Values are parsed as YAML scalars/lists, so ``0.1``, ``true``, ``[0.9, 0.95]`` and ``null`` work.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument '{arg}' (overrides look like --section.key=value)")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    valid = all_keys()
    for key, value in overrides.items():
        if key not in valid:
            raise _unknown_key(key, valid)
        *path, name = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, _coerce(key, _field_types(type(obj))[name], value))
    return cfg


def load_config(source: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Defaults → preset name or YAML path → overrides → validation.

    ``source`` is a preset name (``tiny``), a YAML file, or None for the defaults.
    """
    cfg = Config()
    if source is not None:
        path = Path(source)
        if not path.suffix and not path.exists():
            path = preset_path(str(source))
        _merge(cfg, read_yaml(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def diff(a: Config | dict, b: Config | dict) -> list[str]:
    """Dotted keys whose values differ between two configs (as 'key: a → b')."""
    flat_a, flat_b = _flatten(a if isinstance(a, dict) else to_dict(a)), _flatten(b if isinstance(b, dict) else to_dict(b))
    return [f"{k}: {flat_a.get(k)!r} → {flat_b.get(k)!r}" for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation: consistent values, each error naming its keys


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Check every field against its type and declared bound, then the rules that tie fields together."""
    _validate_fields(cfg)
    m, o, t = cfg.model, cfg.optimizer, cfg.trainer
    _check(m.d_model % m.n_heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _check(m.n_heads % m.kv_heads == 0,
           f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    _check(m.head_dim % 2 == 0, f"head dim d_model/n_heads = {m.head_dim} must be even for RoPE")
    e = m.moe
    if e.num_experts:
        _check(e.top_k <= e.num_experts,
               f"model.moe.top_k ({e.top_k}) must be between 1 and model.moe.num_experts ({e.num_experts})")
    else:
        moe_set = [f"model.moe.{k}" for k, v in to_dict(e).items() if v != getattr(MoEConfig(), k)]
        _check(not moe_set, f"{', '.join(moe_set)} set but model.moe.num_experts is 0 (dense): set "
                            "model.moe.num_experts or remove them")
    _check(all(0 <= b < 1 for b in o.betas), f"optimizer.betas must be in [0, 1), got {list(o.betas)}")
    _check(cfg.schedule.decay_steps <= t.max_steps, f"schedule.decay_steps ({cfg.schedule.decay_steps}) must not "
           f"exceed trainer.max_steps ({t.max_steps})")
    if t.micro_batch_size:
        _check(t.batch_size % t.micro_batch_size == 0,
               f"trainer.batch_size ({t.batch_size}) must be divisible by trainer.micro_batch_size "
               f"({t.micro_batch_size})")
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device) is not None,
           f"trainer.device must be auto|cpu|cuda[:N], got '{t.device}'")
    return cfg


def _validate_fields(obj: Any, prefix: str = "") -> None:
    """Types (a field set by attribute bypasses `_coerce`), finiteness, the int64 range and each declared Bound."""
    types_ = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_fields(value, key + ".")
            continue
        value = _coerce(key, types_[f.name], value)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float):
                _check(math.isfinite(v), f"{key} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool):
                _check(abs(v) <= INT64_MAX, f"{key} must be at most {INT64_MAX} (int64), got {_short(v)}")
        if "bound" in f.metadata:
            f.metadata["bound"].check(key, value)
