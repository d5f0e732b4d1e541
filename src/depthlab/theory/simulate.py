"""Monte-Carlo variance propagation in residual stacks with sparse sub-layers vs closed forms (SPEC §7).

The stack: ``x_0 ~ N(0, σ_0²)`` i.i.d. per token and feature, then per block l (0-based)

    pre:  x_{l+1} = x_l + F_l(N(x_l))            lns:  x_{l+1} = x_l + F_l(N(x_l)/sqrt(l+1))
    post: x_{l+1} = N(x_l + F_l(x_l))

with N the RMSNorm without affine weight (||N(x)||² = d) and F_l a fresh random *linear* branch of effective
per-entry weight std σ_w, made sparse by one of the mechanisms in ``branches.py``. Linearity and fresh weights
make the closed forms exact in expectation (E[x·F] = 0): with effective density p_var,

    Var(x_{l+1}) = Var(x_l) + s_l²·p_var·d·σ_w²                     (pre: s_l = 1; lns: s_l = 1/sqrt(l+1))
    E||∂x_{l+1}/∂x_l − I||_F² = s_l²·p_jac·σ_w²·d·(d−1) / Var(x_l)  (given ||x_l||² = d·Var(x_l))

i.e. SPEC §7's ``σ²_{l+1} = σ²_l + p·d·σ_w²`` and ``||J − I||_F ≈ sqrt(p)·d·σ_w/σ_l``. Here Var(x) is the mean
square per feature (every feature has mean zero by the sign symmetry of the weights). p_var = p_jac = p for
i.i.d. masks and routing; m2(p) for magnitude masks; Σa² (= p) for attention with p_jac = p + (T−1)/T
(position-summed); 1/support for GQA at every group size. Post-LN keeps Var = 1 after block 0 and its Jacobian
distance follows ``(1−c)²(d−1) + 1 + c²·p_jac·d·σ_w²·(d−1)`` with c = 1/sqrt(Var(x_l)(1 + p_var·d·σ_w²)) to
leading order in 1/d.

Jacobians are per token (SPEC §5.3's position-summed column M_s = Σ_t ∂x'_t/∂x_s, which is the ordinary
per-token Jacobian for token-wise branches), from vector-Jacobian products: exact with the d basis vectors as
probes, or the unbiased Rademacher estimate ``E||Aᵀw||² = ||A||_F²``. Alongside the per-token RMS distance the
simulator reports ``||mean_s (M_s − I)||_F``, the token-averaged matrix of SPEC §5.3 on the simulated batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from depthlab import __version__
from depthlab.errors import ConfigError
from depthlab.theory.branches import GQA, MASKS, Attention, IIDMask, MagnitudeMask, Routing

NORMS = ("pre", "lns", "post")
DEFAULT_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
MAX_WEIGHT_FLOATS = 2 ** 28  # one layer's masked weights, seeds × densities × d²: 1 GiB in fp32


@dataclass
class Settings:
    """Everything a simulation depends on (recorded in results.json)."""

    masks: list[str]
    norms: list[str]
    densities: list[float]
    layers: int = 64
    d_model: int = 512
    seeds: int = 3
    seed: int = 0
    tokens: int = 64
    """Tokens per sequence; attention rows mix all of them."""
    sigma_w: float = 0.02
    """Effective per-entry std of each branch's d×d weight (depthlab's init_std)."""
    sigma0: float = 0.02
    """Std of the embedding x_0 (depthlab's init_std); larger values delay the 1/sqrt(l) regime."""
    experts: int = 64
    """Routing: number of experts E (density p = k/E)."""
    heads: int = 32
    """GQA: number of query heads (density p = n_kv_heads/heads)."""
    support: float = 8.0
    """GQA: effective support 1/Σa² of every head's attention rows."""
    jacobian: str = "auto"
    """exact (d basis probes) | estimate (Rademacher probes) | auto (exact when d_model <= 64)."""
    probes: int = 2
    """Rademacher probes per layer in estimate mode (each shared by a seed's tokens; the s.e. over seeds
    includes the probe noise, about sqrt(2/d)/sqrt(probes·seeds) relative on ||J−I||_F²)."""

    @property
    def exact_jacobian(self) -> bool:
        return self.jacobian == "exact" or (self.jacobian == "auto" and self.d_model <= 64)


@dataclass
class Run:
    """One (mechanism, norm) sweep over the densities; arrays are [density, layer], mean over seeds."""

    mask: str
    norm: str
    densities: list[float]
    p_var: list[float]
    """Effective density in the variance closed form."""
    p_jac: list[float]
    """Effective density in the Jacobian closed form."""
    var: np.ndarray
    """Var(x_l) for l = 0..L (mean square per feature)."""
    var_sem: np.ndarray
    var_closed: np.ndarray
    jac: np.ndarray
    """RMS over tokens of ||∂x_{l+1}/∂x_l − I||_F for blocks l = 0..L−1."""
    jac_sem: np.ndarray
    jac_closed: np.ndarray
    jac_mean: np.ndarray
    """||mean_t(J_t − I)||_F: the token-averaged Jacobian (SPEC §5.3's M) on the simulated batch."""
    rel_update: np.ndarray
    """sqrt(E||x_{l+1} − x_l||² / E||x_l||²) per block."""
    rel_closed: np.ndarray | None
    seconds: float
    """Wall-clock time of the sweep."""
    cpu_seconds: float
    """Process CPU time of the sweep, all threads (on a shared machine the wall clock overstates the cost)."""
    slope: list[float | None] = field(default_factory=list)
    """Least-squares growth of Var per unit of the closed form's depth term, divided by d·σ_w² (≈ p_var)."""

    def to_dict(self) -> dict:
        out = {}
        for key, value in asdict(self).items():
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
        return out


@dataclass
class SimulationResult:
    settings: Settings
    runs: list[Run]
    conclusions: list[str]
    seconds: float

    def run(self, mask: str, norm: str) -> Run:
        return next(r for r in self.runs if r.mask == mask and r.norm == norm)

    def to_dict(self) -> dict:
        return {"depthlab_version": __version__, "settings": asdict(self.settings), "seconds": self.seconds,
                "conclusions": self.conclusions, "runs": [r.to_dict() for r in self.runs]}

    def save(self, out: str) -> list[str]:
        """Write results.json (atomically), a PNG per run and a summary figure into ``out``; return paths."""
        from depthlab.theory.report import save

        return save(self, out)


def simulate(mask: str | list[str] = "iid", densities=DEFAULT_DENSITIES, layers: int = 64, d_model: int = 512,
             norm: str | list[str] = "pre", seeds: int = 3, seed: int = 0, **options) -> SimulationResult:
    """Simulate Var(x_l) and the Jacobian distance from identity through a random sparse residual stack.

    ``mask``/``norm`` take one name, a list, or "all". ``options`` are the remaining ``Settings`` fields
    (tokens, sigma_w, sigma0, experts, heads, support, jacobian, probes). Raises ConfigError on bad ranges.
    """
    from depthlab.theory.report import conclusions

    st = Settings(masks=_names(mask, MASKS, "mask"), norms=_names(norm, NORMS, "norm"),
                  densities=[float(p) for p in densities], layers=layers, d_model=d_model, seeds=seeds,
                  seed=seed)
    for key, value in options.items():
        if not hasattr(st, key) or key in ("masks", "norms", "densities"):
            raise ConfigError(f"unknown simulation option '{key}'")
        setattr(st, key, value)
    validate(st)
    start = time.perf_counter()
    runs = [_sweep(st, m, n) for m in st.masks for n in st.norms]
    result = SimulationResult(settings=st, runs=runs, conclusions=[], seconds=time.perf_counter() - start)
    result.conclusions = conclusions(result)
    return result


def _names(value: str | list[str], valid: tuple[str, ...], what: str) -> list[str]:
    names = list(valid) if value == "all" else [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown {what} '{name}'; choose from {'|'.join(valid)}|all")
    if not names:
        raise ConfigError(f"no {what} given")
    return names


def validate(st: Settings) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, ps = st.d_model, st.densities
    check(bool(ps), "give at least one density")
    check(all(0 < p <= 1 for p in ps), f"densities must be in (0, 1], got {ps}")
    check(len(set(ps)) == len(ps), f"densities must be distinct, got {ps}")
    check(1 <= st.layers <= 10_000, f"layers must be in [1, 10000], got {st.layers}")
    check(2 <= d <= 8192, f"d_model must be in [2, 8192], got {d}")
    check(1 <= st.seeds <= 1000, f"seeds must be in [1, 1000], got {st.seeds}")
    check(2 <= st.tokens <= 4096, f"tokens must be in [2, 4096], got {st.tokens}")
    check(all(math.isfinite(v) for v in (*ps, st.sigma_w, st.sigma0, st.support)),  # results.json has no inf/NaN
          f"densities, sigma_w, sigma0 and support must be finite, got {ps}, {st.sigma_w}, {st.sigma0}, "
          f"{st.support}")
    check(st.sigma_w > 0 and st.sigma0 > 0,
          f"sigma_w and sigma0 must be positive, got {st.sigma_w}, {st.sigma0}")
    check(st.jacobian in ("auto", "exact", "estimate"),
          f"jacobian must be auto|exact|estimate, got {st.jacobian}")
    check(st.probes >= 1, f"probes must be >= 1, got {st.probes}")
    check(st.seeds * len(ps) * d * d <= MAX_WEIGHT_FLOATS,
          f"seeds × densities × d_model² = {st.seeds * len(ps) * d * d:.3g} floats per layer is too large "
          f"(max {MAX_WEIGHT_FLOATS:.3g}); use fewer seeds/densities or a smaller d_model")
    if "magnitude" in st.masks:
        check(all(p * d * d >= 1 for p in ps),
              f"magnitude: every density must keep >= 1 of the {d * d} weights")
    if "routing" in st.masks:
        check(st.experts >= 1, f"experts must be >= 1, got {st.experts}")
        bad = [p for p in ps if abs(p * st.experts - round(p * st.experts)) > 1e-9 or p * st.experts < 0.5]
        check(not bad, f"routing: density p = k/E needs p·experts to be a positive integer (experts = "
                       f"{st.experts}); bad: {bad}")
    if "attention" in st.masks:
        check(all(p >= 1 / st.tokens for p in ps),
              f"attention: density p = Σa² must be >= 1/tokens = {1 / st.tokens:.4g} (support <= tokens); "
              f"raise --tokens")
    if "gqa" in st.masks:
        check(st.heads >= 1 and d % st.heads == 0,
              f"gqa: d_model ({d}) must be divisible by heads ({st.heads})")
        bad = [p for p in ps if abs(1 / p - round(1 / p)) > 1e-9 or st.heads % round(1 / p)]
        check(not bad, f"gqa: density p = 1/G needs G = 1/p to divide heads ({st.heads}); bad: {bad}")
        check(1 <= st.support <= st.tokens, f"gqa: support must be in [1, tokens], got {st.support}")


def _branch(st: Settings, mask: str, p: torch.Tensor, gen: torch.Generator):
    common = (st.seeds, st.d_model, p, st.sigma_w)
    if mask == "iid":
        return IIDMask(*common)
    if mask == "magnitude":
        return MagnitudeMask(*common)
    if mask == "routing":
        return Routing(*common, st.experts)
    if mask == "attention":
        return Attention(*common, st.tokens, gen)
    return GQA(*common, st.tokens, st.heads, st.support, gen)


def effective_densities(st: Settings, mask: str) -> tuple[np.ndarray, np.ndarray]:
    """(p_var, p_jac) of the closed forms for each density (see the module docstring)."""
    p = torch.tensor(st.densities, dtype=torch.float64)
    cross = (st.tokens - 1) / st.tokens  # Σ_{t≠t'} E[a_ts]E[a_t's]: the column-sum mean of attention rows
    if mask == "magnitude":
        p_var = p_jac = MagnitudeMask.energy_fraction(p)
    elif mask == "attention":
        p_var, p_jac = p, p + cross
    elif mask == "gqa":
        p_var = torch.full_like(p, 1 / st.support)
        p_jac = p_var + cross
    else:
        p_var = p_jac = p
    return p_var.numpy(), p_jac.numpy()


def closed_forms(st: Settings, norm: str, p_var: np.ndarray, p_jac: np.ndarray):
    """Var(x_l) for l = 0..L, and the Jacobian distance and relative update per block, from the recursions."""
    d, L, w2 = st.d_model, st.layers, st.sigma_w ** 2
    s2 = 1 / np.arange(1, L + 1) if norm == "lns" else np.ones(L)  # s_l² per block
    var = np.empty((len(p_var), L + 1))
    var[:, 0] = st.sigma0 ** 2
    if norm == "post":
        var[:, 1:] = 1.0
        c = 1 / np.sqrt(var[:, :-1] * (1 + p_var[:, None] * d * w2))
        jac = np.sqrt((1 - c) ** 2 * (d - 1) + 1 + c ** 2 * p_jac[:, None] * d * w2 * (d - 1))
        return var, jac, None
    var[:, 1:] = var[:, :1] + np.cumsum(s2[None, :] * p_var[:, None] * d * w2, axis=1)
    jac = np.sqrt(s2 * p_jac[:, None] * w2 * d * (d - 1) / var[:, :-1])
    rel = np.sqrt(s2 * p_var[:, None] * d * w2 / var[:, :-1])
    return var, jac, rel


def _sweep(st: Settings, mask: str, norm: str) -> Run:
    start, cpu_start = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(st.seed)  # same seed for every norm: the norms see the same weights
    S, D, T, d, L = st.seeds, len(st.densities), st.tokens, st.d_model, st.layers
    p = torch.tensor(st.densities)
    branch = _branch(st, mask, p, gen)
    x = (torch.randn(S, 1, T, d, generator=gen) * st.sigma0).expand(S, D, T, d).clone()

    msq = torch.zeros(S, D, L + 1, dtype=torch.float64)
    jac_tok = torch.zeros(S, D, L, dtype=torch.float64)
    jac_avg = torch.zeros(S, D, L, dtype=torch.float64)
    upd = torch.zeros(S, D, L, dtype=torch.float64)
    msq[..., 0] = _mean_square(x)
    for l in range(L):
        x.requires_grad_(True)
        new = _block(norm, branch.layer(gen), x, l)
        for probes, weight in _probes(st, gen):
            tok, avg = _jacobian(x, new, probes, weight)
            jac_tok[..., l] += tok
            jac_avg[..., l] += avg
        x, new = x.detach(), new.detach()
        upd[..., l] = _mean_square(new - x) / msq[..., l]
        x = new
        msq[..., l + 1] = _mean_square(x)

    p_var, p_jac = effective_densities(st, mask)
    var_closed, jac_closed, rel_closed = closed_forms(st, norm, p_var, p_jac)
    var, var_sem = _mean_sem(msq)
    jac, jac_sem = _mean_sem(jac_tok.sqrt())
    run = Run(mask=mask, norm=norm, densities=list(st.densities), p_var=p_var.tolist(), p_jac=p_jac.tolist(),
              var=var, var_sem=var_sem, var_closed=var_closed, jac=jac, jac_sem=jac_sem,
              jac_closed=jac_closed, jac_mean=_mean_sem(jac_avg.sqrt())[0],
              rel_update=_mean_sem(upd.sqrt())[0], rel_closed=rel_closed,
              seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
    run.slope = _slopes(st, run)
    return run


def _block(norm: str, layer, x: torch.Tensor, l: int) -> torch.Tensor:
    """Block l of the stack (0-based) applied to the stream x: [S, D, T, d]."""
    d = x.shape[-1]
    if norm == "post":
        return _rms_norm(x + layer(x), d)
    scale = (l + 1) ** -0.5 if norm == "lns" else 1.0
    return x + layer(_rms_norm(x, d) * scale)


def _rms_norm(x: torch.Tensor, d: int) -> torch.Tensor:
    return x * (d ** 0.5 / torch.linalg.vector_norm(x, dim=-1, keepdim=True))


def _jacobian(x: torch.Tensor, new: torch.Tensor, probes: torch.Tensor, weight: float):
    """Σ over probes of weight·||(M_s − I)ᵀw||² averaged over tokens s, and of weight·||mean_s (M_s − I)ᵀw||².

    M_s = Σ_t ∂x'_t/∂x_s (SPEC §5.3's position-summed Jacobian column; the per-token Jacobian for token-wise
    branches). With the same cotangent w on every token, one vector-Jacobian product gives wᵀM_s for all s at
    once; the probes ([P, S, 1, 1, d]) go through one batched backward.
    """
    cot = probes.expand(-1, *new.shape).contiguous()
    (vjp,) = torch.autograd.grad(new, x, cot, retain_graph=True, is_grads_batched=True)
    r = (vjp - cot).double()
    per_token = (r * r).sum(-1).mean(-1).sum(0)
    r_mean = r.mean(-2)
    return weight * per_token, weight * (r_mean * r_mean).sum(-1).sum(0)


def _probes(st: Settings, gen: torch.Generator, chunk: int = 16):
    """Batches of probes w ([P, S, 1, 1, d]) with weights so that Σ weight·||Aᵀw||² = ||A||_F² exactly (the d
    basis vectors) or in expectation (Rademacher). A probe is shared by all tokens of a seed, so the
    token-averaged Jacobian is estimated from the same products."""
    d = st.d_model
    if st.exact_jacobian:
        eye = torch.eye(d).view(d, 1, 1, 1, d)
        for i in range(0, d, chunk):
            yield eye[i:i + chunk], 1.0
    else:
        z = torch.randint(0, 2, (st.probes, st.seeds, 1, 1, d), generator=gen).float() * 2 - 1
        yield z, 1.0 / st.probes


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1).double().mean(-1) / x.shape[-1]  # [S, D]


def _mean_sem(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds and its standard error (0 with one seed)."""
    v = values.numpy()
    sem = v.std(axis=0, ddof=1) / math.sqrt(v.shape[0]) if v.shape[0] > 1 else np.zeros(v.shape[1:])
    return v.mean(axis=0), sem


def _slopes(st: Settings, run: Run) -> list[float | None]:
    """Fit Var_l = a + b·depth_l (l for pre, Σ_{k≤l} 1/k for lns); return b/(d·σ_w²) per density."""
    if run.norm == "post":
        return [None] * len(run.densities)
    steps = 1 / np.arange(1, st.layers + 1) if run.norm == "lns" else np.ones(st.layers)
    depth = np.concatenate([[0.0], np.cumsum(steps)])
    return [float(np.polyfit(depth, v, 1)[0] / (st.d_model * st.sigma_w ** 2)) for v in run.var]
