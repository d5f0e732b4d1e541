"""Jacobian of each block, as a distance from the identity map (SPEC §5.3).

Block l maps X = h_l to Y = h_{l+1}. We differentiate the *branch* F(X) = Y − X of an fp32 copy of the block, so
the identity is added exactly (A = M − I is what is measured) and nothing is accumulated in bf16 (defect 7).

* ``kind="position_summed"`` (the paper's): M[i,j] = (1/(N·T)) Σ_{b,s} ∂(Σ_t Y[b,t,i]) / ∂X[b,s,j]. One
  vector-Jacobian product with the cotangent u broadcast over all positions gives uᵀA summed over the inputs, so
  ``mode="exact"`` needs d VJPs per micro-batch and layer, and ``mode="estimate"`` k Rademacher probes:
  ||A||_F² ≈ mean_r ||Aᵀz_r||², tr(A) ≈ mean_r z_rᵀAᵀz_r, diag(A) ≈ mean_r z_r ⊙ Aᵀz_r, plus power iteration on
  MᵀM (Mv from a double-backward JVP) for σ_max(M). Standard errors come from the spread over probes.
* ``kind="per_token"``: M_tok[i,j] = mean_{b,t} ∂Y[b,t,i]/∂X[b,t,j] (no cross-position terms). Exact mode needs a
  VJP per (position, feature): d·T per micro-batch and layer — use it on small models. The estimate samples, per
  probe, two independent positions t, t' with one Rademacher z: (zᵀA_t)·(zᵀA_t') is unbiased for ||A||_F².
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from depthlab.analysis.engine import Baseline, Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError

SUMMARIES = ("jacobian_norm", "off_diagonal_norm", "diagonal_mean", "diagonal_std", "frobenius_norm",
             "spectral_norm")


@dataclass
class JacobianResult(Result):
    mode: str
    kind: str
    layers: list[dict]
    """Per layer: the six SPEC summaries, and for estimates their standard errors (`<name>_se`) where available."""
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

    def jvp_summed(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_{b,t} (∂F/∂X · v broadcast over all positions)[b,t,:] via double backward."""
        u = torch.zeros(self.f.shape[-1], requires_grad=True)
        with torch.enable_grad():
            g = torch.autograd.grad(self.f, self.x, u.expand_as(self.f), retain_graph=True, create_graph=True)[0]
            return torch.autograd.grad((g * v).sum(), u, retain_graph=True)[0]


def _summaries(A: torch.Tensor) -> dict:
    """The SPEC summaries of M = I + A from the exact matrix A = M − I (fp64)."""
    d = A.shape[0]
    M = A + torch.eye(d, dtype=A.dtype)
    diag = M.diagonal()
    off = M - torch.diag(diag)
    return {"jacobian_norm": A.norm().item() / d,
            "off_diagonal_norm": off.norm().item() / math.sqrt(max(d * d - d, 1)),
            "diagonal_mean": diag.mean().item(), "diagonal_std": diag.std(unbiased=False).item(),
            "frobenius_norm": M.norm().item(), "spectral_norm": torch.linalg.matrix_norm(M, 2).item()}


def _estimate_summaries(sq: torch.Tensor, tr: torch.Tensor, diag: torch.Tensor, d: int,
                        spectral: float) -> dict:
    """Summaries from probe samples: sq_r ≈ ||A||_F², tr_r ≈ tr(A), diag ≈ diag(A); with standard errors."""
    k = sq.numel()

    def se(x):
        return (x.std(unbiased=True) / math.sqrt(k)).item() if k > 1 else float("nan")

    a_fro2 = sq.mean().clamp_min(0)
    trace = tr.mean()
    m_diag = 1.0 + diag
    m_fro2 = (a_fro2 + 2 * trace + d).clamp_min(0)
    off2 = (m_fro2 - (m_diag**2).sum()).clamp_min(0)
    jn = a_fro2.sqrt().item() / d
    return {"jacobian_norm": jn, "jacobian_norm_se": se(sq) / (2 * max(jn, 1e-12) * d * d),
            "off_diagonal_norm": off2.sqrt().item() / math.sqrt(max(d * d - d, 1)),
            "diagonal_mean": 1.0 + trace.item() / d, "diagonal_mean_se": se(tr) / d,
            "diagonal_std": m_diag.std(unbiased=False).item(),
            "frobenius_norm": m_fro2.sqrt().item(), "spectral_norm": spectral}


def jacobian(model, input_ids, *, mode: str = "exact", kind: str = "position_summed", probes: int = 32,
             power_iters: int = 10, layers=None, seed: int = 0, micro_batch_size: int = 8,
             cache_budget_mb: float = 2048.0, engine: Engine | None = None, progress: bool = False) -> JacobianResult:
    """Per-layer distance of each block's Jacobian from the identity (exact or Rademacher estimate)."""
    if mode not in ("exact", "estimate"):
        raise AnalysisError(f"jacobian mode must be 'exact' or 'estimate', got {mode!r}")
    if kind not in ("position_summed", "per_token"):
        raise AnalysisError(f"jacobian kind must be 'position_summed' or 'per_token', got {kind!r}")
    if mode == "estimate" and probes < 2:
        raise AnalysisError(f"the estimate needs at least 2 probes, got {probes}")
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
        gen = torch.Generator().manual_seed(seed + l)
        if mode == "exact":
            A = _exact(eng, block, l, d, kind) / (N * T)
            rows.append({"layer": l, **_summaries(A)})
        elif kind == "position_summed":
            rows.append({"layer": l, **_estimate_summed(eng, block, l, d, N * T, probes, power_iters, gen)})
        else:
            rows.append({"layer": l, **_estimate_per_token(eng, block, l, d, N, T, probes, gen)})
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
                    cot = torch.zeros(T, d)
                    cot[t, i] = 1.0
                    A[i] += branch.vjp(cot)[:, t].double().sum(0)
    return A


def _estimate_summed(eng: Engine, block, layer: int, d: int, tokens: int, probes: int, power_iters: int,
                     gen: torch.Generator) -> dict:
    Z = torch.randint(0, 2, (probes, d), generator=gen).float() * 2 - 1
    V = torch.zeros(probes, d, dtype=torch.float64)  # rows: Aᵀ z_r
    for base in eng.baselines():
        branch = _Branch(block, base, layer)
        for r in range(probes):
            V[r] += branch.vjp(Z[r]).double().sum((0, 1))
    V /= tokens
    Zd = Z.double()
    sq, tr, diag = (V**2).sum(1), (Zd * V).sum(1), (Zd * V).mean(0)
    spectral = _power_iteration(eng, block, layer, d, tokens, V + Zd, power_iters) if power_iters else float("nan")
    return _estimate_summaries(sq, tr, diag, d, spectral)


def _power_iteration(eng: Engine, block, layer: int, d: int, tokens: int, start: torch.Tensor, iters: int) -> float:
    """σ_max(M) by power iteration on MᵀM, started from the top direction of the probes' Mᵀz.

    Each iteration sweeps the micro-batches twice (Mv needs every batch before Mᵀ(Mv) can start), rebuilding each
    batch's graph so memory stays one micro-batch.
    """
    v = torch.linalg.svd(start, full_matrices=False).Vh[0].float()
    sigma = float("nan")
    for _ in range(iters):
        mv = v.double() + sum(_Branch(block, b, layer).jvp_summed(v).double() for b in eng.baselines()) / tokens
        mtmv = mv + sum(_Branch(block, b, layer).vjp(mv.float()).double().sum((0, 1))
                        for b in eng.baselines()) / tokens
        sigma = mtmv.norm().sqrt().item()
        v = (mtmv / mtmv.norm()).float()
    return sigma


def _estimate_per_token(eng: Engine, block, layer: int, d: int, N: int, T: int, probes: int,
                        gen: torch.Generator) -> dict:
    Z = torch.randint(0, 2, (probes, d), generator=gen).float() * 2 - 1
    pos = torch.randint(0, T, (probes, 2), generator=gen)
    V = torch.zeros(2, probes, d, dtype=torch.float64)  # zᵀA_t and zᵀA_t' for two independent positions
    for base in eng.baselines():
        branch = _Branch(block, base, layer)
        for r in range(probes):
            for j in range(2):
                t = int(pos[r, j])
                cot = torch.zeros(T, d)
                cot[t] = Z[r]
                V[j, r] += branch.vjp(cot)[:, t].double().sum(0)
    V /= N
    Zd = Z.double()
    sq = (V[0] * V[1]).sum(1)
    tr = (Zd * V).sum(-1).mean(0)
    diag = (Zd * V).mean((0, 1))
    return _estimate_summaries(sq, tr, diag, d, float("nan"))
