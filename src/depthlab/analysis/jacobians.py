"""Jacobian of each block, as a distance from the identity map (SPEC §5.3).

Block l maps X = h_l to Y = h_{l+1}. We differentiate the *branch* F(X) = Y − X of an fp32 copy of the block, so
the identity is added exactly (A = M − I is what is measured) and nothing is accumulated in bf16 (defect 7).

* ``kind="position_summed"`` (the paper's): M[i,j] = (1/(N·T)) Σ_{b,s} ∂(Σ_t Y[b,t,i]) / ∂X[b,s,j]. One
  vector-Jacobian product with the cotangent z broadcast over all positions gives v = Aᵀz exactly, so
  ``mode="exact"`` needs d VJPs per micro-batch and layer.
* ``kind="per_token"``: M_tok[i,j] = mean_{b,t} ∂Y[b,t,i]/∂X[b,t,j] (no cross-position terms). Exact mode needs a
  VJP per (position, feature): d·T per micro-batch and layer — use it on small models. The estimate draws, per
  probe, two independent positions t, t' and takes u, u' = (zᵀA_{·t}, zᵀA_{·t'}) averaged over sequences: each is
  unbiased for A_tokᵀz and they are independent given z.

``mode="estimate"`` uses k Rademacher probes z_r (z_i = ±1). Per probe it keeps q_r, an unbiased sample of ||A||_F²
(||Aᵀz||², resp. u·u'), and w_r = z ⊙ (Aᵀz) (resp. z ⊙ (u+u')/2), unbiased for diag(A) since z_i² = 1; tr(A) is Σ w.
Every summary is a smooth function g(q̄, w̄) of these means — ||A||_F = sqrt(q̄), diagonal variance = var_i(w̄),
||offdiag||² = q̄ − Σ w̄², ||M||_F² = q̄ + 2 tr + d — and g of a mean is biased (the diagonal spread by +115% at 16
probes, because the probe noise of w̄ adds its variance). Each is therefore reported as the **jackknife** over
probes, k·g(all) − (k−1)·mean_r g(all but r), which removes the O(1/k) bias — exactly for the quadratic
``diagonal_var`` (it is then the unbiased U-statistic, and may come out negative when the true spread is below the
probe noise), to well under its standard error for the square roots — with the jackknife standard error
``<name>_se``. ``diagonal_std`` = sqrt(diagonal_var) has no such estimator (its bias stays ~+10% on 16-wide blocks),
so estimate mode does not report it (NaN). ``spectral_norm`` σ_max(M) is not a probe average: it is computed
by Lanczos iteration on MᵀM (Mv by double backward, for both kinds), started from the probes' top direction and
reported only once converged (residual below ``SPECTRAL_TOL`` of the Ritz value; NaN otherwise), with the number of
iterations used in ``spectral_iters``. Exact mode reports no standard errors.

Every quantity is a sum over tokens (A, the probe products Aᵀz and u, u', and each Lanczos product MᵀMv), so
data-parallel ranks (`depthlab.analysis.engine`) all-reduce them; the probes are drawn from the same seeded
generator on every rank, so the estimates and standard errors equal one process's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from depthlab.analysis.engine import Baseline, Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError

SUMMARIES = ("jacobian_norm", "off_diagonal_norm", "diagonal_mean", "diagonal_std", "diagonal_var", "frobenius_norm",
             "spectral_norm")
PROBED = ("jacobian_norm", "off_diagonal_norm", "diagonal_mean", "diagonal_var", "frobenius_norm")
"""The summaries estimated from probe averages, each with a jackknife standard error."""
SPECTRAL_TOL = 1e-4
"""Lanczos stops when the residual bound β·|y_last| of the top Ritz pair of MᵀM is below this fraction of it."""


@dataclass
class JacobianResult(Result):
    mode: str
    kind: str
    layers: list[dict]
    """Per layer: the SPEC summaries plus diagonal_var (= diagonal_std²). Estimates add `<name>_se` (jackknife over
    probes) for the PROBED summaries and `spectral_iters` (Lanczos iterations; spectral_norm is NaN/null if it did
    not converge); their diagonal_std is NaN/null (no unbiased estimate: use diagonal_var)."""
    means: dict
    """Each summary averaged over layers."""
    identity_fraction: float
    """Fraction of layers whose diagonal_mean > 0.5."""
    probes: int
    tokens: int


def _cast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, tuple):
        return tuple(_cast(v) for v in x)
    return x


class _Branch:
    """F(X) = block(X) − X of an fp32 block for one micro-batch, with a retained graph for repeated VJPs."""

    def __init__(self, block: torch.nn.Module, base: Baseline, layer: int):
        args, kwargs = base.calls[layer]
        self.x = base.hs[layer].detach().float().requires_grad_(True)
        # The math SDPA kernel is built from differentiable ops, so double backward (Mv) works through attention.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            out = block(self.x, *_cast(args), **{k: _cast(v) for k, v in kwargs.items()})
            self.f = (out[0] if isinstance(out, tuple) else out) - self.x

    def vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        """Σ_{t,i} c[b,t,i] ∂F[b,t,i]/∂X — the gradient with respect to X [B, T, d]."""
        return torch.autograd.grad(self.f, self.x, cotangent.expand_as(self.f), retain_graph=True)[0]

    def jvp(self, v: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Σ_b of (∂F/∂X · v) via double backward: with v at every position and summed over output positions
        (position_summed), or at `position` only, read at that position (the per-token diagonal block)."""
        d = self.f.shape[-1]
        u = torch.zeros(d, requires_grad=True)
        with torch.enable_grad():
            if position is None:
                cot = u.expand_as(self.f)
            else:
                cot = torch.zeros(self.f.shape[1], 1).index_fill_(0, torch.tensor([position]), 1.0) * u
            g = torch.autograd.grad(self.f, self.x, cot.expand_as(self.f), retain_graph=True, create_graph=True)[0]
            g = g if position is None else g[:, position]
            return torch.autograd.grad((g * v).sum(), u, retain_graph=True)[0]

    def vjp_at(self, w: torch.Tensor, position: int) -> torch.Tensor:
        """Σ_b A_{b,t}ᵀ w for t = `position` (cotangent and gradient read at the same position), [d]."""
        cot = torch.zeros(self.f.shape[1:])
        cot[position] = w
        return self.vjp(cot)[:, position].sum(0)


def _summaries(A: torch.Tensor) -> dict:
    """The SPEC summaries of M = I + A from the exact matrix A = M − I (fp64)."""
    d = A.shape[0]
    M = A + torch.eye(d, dtype=A.dtype)
    diag = M.diagonal()
    off = M - torch.diag(diag)
    return {"jacobian_norm": A.norm().item() / d,
            "off_diagonal_norm": off.norm().item() / math.sqrt(max(d * d - d, 1)),
            "diagonal_mean": diag.mean().item(), "diagonal_std": diag.std(unbiased=False).item(),
            "diagonal_var": diag.var(unbiased=False).item(), "frobenius_norm": M.norm().item(), "spectral_norm": torch.linalg.matrix_norm(M, 2).item()}


def _probe_summaries(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The PROBED summaries from probe means q̄ (≈ ||A||_F²) and w̄ (≈ diag A), batched over leading dims."""
    d = w.shape[-1]
    trace = w.sum(-1)
    return torch.stack([
        q.clamp_min(0).sqrt() / d,
        (q - (w**2).sum(-1)).clamp_min(0).sqrt() / math.sqrt(max(d * d - d, 1)),
        1.0 + trace / d,
        w.var(-1, unbiased=False),
        (q + 2 * trace + d).clamp_min(0).sqrt(),
    ], -1)


def _jackknife(q: torch.Tensor, w: torch.Tensor) -> dict:
    """Jackknife-corrected probe summaries and their standard errors from per-probe samples q [k], w [k, d]."""
    k = q.shape[0]
    full = _probe_summaries(q.mean(), w.mean(0))
    loo = _probe_summaries((q.sum() - q) / (k - 1), (w.sum(0) - w) / (k - 1))  # [k, 5]: all probes but r
    mean = loo.mean(0)
    est = k * full - (k - 1) * mean
    se = ((k - 1) / k * ((loo - mean) ** 2).sum(0)).sqrt()
    out = {}
    for i, name in enumerate(PROBED):
        out[name], out[f"{name}_se"] = est[i].item(), se[i].item()
    return out


def jacobian(model, input_ids, *, mode: str = "exact", kind: str = "position_summed", probes: int = 32,
             power_iters: int = 30, layers=None, seed: int = 0, micro_batch_size: int = 8,
             cache_budget_mb: float = 2048.0, engine: Engine | None = None, progress: bool = False) -> JacobianResult:
    """Per-layer distance of each block's Jacobian from the identity (exact, or Rademacher estimate).

    probes: Rademacher probes per layer (estimate mode, >= 2); power_iters: the most Lanczos iterations for
    spectral_norm in estimate mode (0 skips it: NaN).
    """
    if mode not in ("exact", "estimate"):
        raise AnalysisError(f"jacobian mode must be 'exact' or 'estimate', got {mode!r}")
    if kind not in ("position_summed", "per_token"):
        raise AnalysisError(f"jacobian kind must be 'position_summed' or 'per_token', got {kind!r}")
    if mode == "estimate" and probes < 2:
        raise AnalysisError(f"the estimate needs at least 2 probes, got {probes}")
    if power_iters < 0:
        raise AnalysisError(f"power_iters must be >= 0, got {power_iters}")
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    chosen = list(range(eng.n_layers)) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < eng.n_layers for l in chosen):
        raise AnalysisError(f"jacobian layers must lie in 0..{eng.n_layers - 1}, got {chosen}")
    d = eng.stack.d_model
    N, T = eng.input_ids.shape
    rows = []
    for l in tqdm(chosen, desc="jacobian", disable=not progress, leave=False):
        block = eng.stack.blocks[l]
        if any(p.dtype != torch.float32 for p in block.parameters()):
            block = copy.deepcopy(block).float()
        if mode == "exact":
            rows.append({"layer": l, **_summaries(_exact(eng, block, l, d, kind) / (N * T))})
            continue
        gen = torch.Generator().manual_seed(seed + l)
        probe = _probe_summed if kind == "position_summed" else _probe_per_token
        q, w, start = probe(eng, block, l, d, probes, gen)
        row = {"layer": l, **_jackknife(q, w), "diagonal_std": math.nan, "spectral_norm": math.nan,
               "spectral_iters": 0}
        if power_iters:
            row["spectral_norm"], row["spectral_iters"] = _lanczos(_Operator(eng, block, l, kind), start,
                                                                   power_iters)
        rows.append(row)
    means = {k: sum(r[k] for r in rows) / len(rows) for k in SUMMARIES}
    identity = sum(r["diagonal_mean"] > 0.5 for r in rows) / len(rows)
    return JacobianResult(mode, kind, rows, means, identity, probes if mode == "estimate" else d, N * T)


def _exact(eng: Engine, block, layer: int, d: int, kind: str) -> torch.Tensor:
    """Σ over tokens of the exact branch Jacobian A (rows: output feature i, columns: input feature j), fp64."""
    A = torch.zeros(d, d, dtype=torch.float64)
    eye = torch.eye(d)
    for base in eng.baselines():
        branch = _Branch(block, base, layer)
        T = branch.x.shape[1]
        for i in range(d):
            if kind == "position_summed":
                A[i] += branch.vjp(eye[i]).double().sum((0, 1))
            else:
                for t in range(T):
                    A[i] += branch.vjp_at(eye[i], t).double()
    return eng.all_sum(A)


def _rademacher(probes: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (probes, d), generator=gen).float() * 2 - 1


def _probe_summed(eng: Engine, block, layer: int, d: int, probes: int, gen: torch.Generator):
    """Per-probe q_r = ||Aᵀz_r||², w_r = z_r ⊙ Aᵀz_r (position-summed A), and M's rows Mᵀz_r to start Lanczos."""
    Z = _rademacher(probes, d, gen)
    V = torch.zeros(probes, d, dtype=torch.float64)  # rows: Aᵀ z_r
    for base in eng.baselines():
        branch = _Branch(block, base, layer)
        for r in range(probes):
            V[r] += branch.vjp(Z[r]).double().sum((0, 1))
    V = eng.all_sum(V) / eng.input_ids.numel()
    Zd = Z.double()
    return (V**2).sum(1), Zd * V, V + Zd


def _probe_per_token(eng: Engine, block, layer: int, d: int, probes: int, gen: torch.Generator):
    """Per-probe q_r = u_r·u'_r and w_r = z_r ⊙ (u_r + u'_r)/2 from two independent random positions."""
    N, T = eng.input_ids.shape
    Z = _rademacher(probes, d, gen)
    pos = torch.randint(0, T, (probes, 2), generator=gen)
    U = torch.zeros(2, probes, d, dtype=torch.float64)  # zᵀA_t and zᵀA_t' averaged over the sequences
    for base in eng.baselines():
        branch = _Branch(block, base, layer)
        for r in range(probes):
            for j in range(2):
                U[j, r] += branch.vjp_at(Z[r], int(pos[r, j])).double()
    U = eng.all_sum(U) / N
    Zd = Z.double()
    return (U[0] * U[1]).sum(1), Zd * (U[0] + U[1]) / 2, (U[0] + U[1]) / 2 + Zd


class _Operator:
    """v ↦ MᵀMv for one block and kind, sweeping every micro-batch (rebuilding each batch's graph, so memory stays
    one micro-batch): Mv needs every batch before Mᵀ(Mv) can start."""

    def __init__(self, eng: Engine, block, layer: int, kind: str):
        self.eng, self.block, self.layer, self.kind = eng, block, layer, kind
        self.tokens = eng.input_ids.numel()

    def _apply(self, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        total = torch.zeros_like(v)
        vf = v.float()
        for base in self.eng.baselines():
            branch = _Branch(self.block, base, self.layer)
            if self.kind == "position_summed":
                total += (branch.vjp(vf).sum((0, 1)) if transpose else branch.jvp(vf)).double()
            else:
                for t in range(branch.x.shape[1]):
                    total += (branch.vjp_at(vf, t) if transpose else branch.jvp(vf, t)).double()
        return v + self.eng.all_sum(total) / self.tokens

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(self._apply(v, transpose=False), transpose=True)


def _lanczos(op: _Operator, start: torch.Tensor, iters: int) -> tuple[float, int]:
    """σ_max(M) = sqrt(λ_max(MᵀM)) by Lanczos with full reorthogonalisation, started from the top right singular
    direction of the probes' Mᵀz; (NaN, iters) when the residual bound has not reached SPECTRAL_TOL."""
    q = torch.linalg.svd(start, full_matrices=False).Vh[0].double()
    Q, alpha, beta = [q / q.norm()], [], []
    for j in range(iters):
        w = op(Q[-1])
        alpha.append(torch.dot(Q[-1], w))
        basis = torch.stack(Q)
        for _ in range(2):  # twice is enough to keep the basis orthogonal in fp64
            w = w - basis.T @ (basis @ w)
        beta.append(w.norm())
        off = torch.tensor(beta[:-1], dtype=torch.float64)
        tri = torch.diag(torch.stack(alpha)) + torch.diag(off, 1) + torch.diag(off, -1)
        theta, y = torch.linalg.eigh(tri)
        if beta[-1] * y[-1, -1].abs() <= SPECTRAL_TOL * theta[-1] or beta[-1] <= 1e-12 * theta[-1]:
            return theta[-1].clamp_min(0).sqrt().item(), j + 1
        Q.append(w / beta[-1])
    return math.nan, iters
