"""Usefulness by linear replacement (SPEC §5.4).

For each block l an affine map ``Y ≈ X·W + b`` is fitted by least squares from X = h_l to Y = h_{l+1} (fp64 normal
equations accumulated in one streaming pass), the block is replaced by ``x ↦ x·W + b`` — applied as ``x @ W``, *not*
``nn.Linear(weight=W)`` which would apply Wᵀ (defect 1 of prior code) — and the LM loss is measured by resuming the
stack from the cached h_l. Total cost: one baseline pass plus L(L+1)/2 block evaluations and L LM-head passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from depthlab.analysis.engine import Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError


@dataclass
class AffineMap:
    """``y = x @ weight + bias`` with weight [d_in, d_out] (row-vector convention)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32)
        b = self.bias.to(device=x.device, dtype=torch.float32)
        return (x.float() @ w + b).to(x.dtype)


def solve_affine(xtx: torch.Tensor, xty: torch.Tensor) -> AffineMap:
    """Least-squares affine map from the augmented normal equations ([x, 1]ᵀ[x, 1], [x, 1]ᵀy).

    The system is Jacobi-scaled before a minimum-norm solve (gelsd), which equals the exact least-squares fit
    whenever it is unique and stays stable when the stream has huge outlier features or fewer tokens than d.
    """
    scale = xtx.diagonal().clamp_min(1e-300).rsqrt()
    a = xtx * scale[:, None] * scale[None, :]
    z = torch.linalg.lstsq(a, xty * scale[:, None], driver="gelsd").solution
    coef = z * scale[:, None]
    return AffineMap(coef[:-1], coef[-1])


@dataclass
class Usefulness(Result):
    loss_ratios: list[float]
    """L_l / L_0: LM loss with block l linearly replaced over the intact loss."""
    useful: list[bool]
    """loss_ratio > 1 + tau."""
    score: float
    """Fraction of useful blocks (a multiple of 1/L)."""
    continuous_score: float
    """mean_l log(loss_ratio_l)."""
    tau: float
    baseline_loss: float
    replaced_losses: list[float]
    score_interval: list[float]
    """Bootstrap interval (over sequences) of the score, at `confidence`."""
    continuous_interval: list[float]
    confidence: float
    split: bool
    """True when the maps were fitted on the first half of the sequences and evaluated on the second."""
    fit_tokens: int
    eval_tokens: int


def fit_affine_maps(engine: Engine, progress: bool = False) -> list[AffineMap]:
    """One streaming pass over the engine's baselines: least-squares maps h_l → h_{l+1} for every block."""
    L, d = engine.n_layers, engine.stack.d_model
    xtx = torch.zeros(L, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(L, d + 1, d, dtype=torch.float64)
    for base in tqdm(engine.baselines(), total=engine.num_batches, desc="usefulness fit", disable=not progress,
                     leave=False):
        for l in range(L):
            x = base.hs[l].reshape(-1, d).double().cpu()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            xtx[l] += x.T @ x
            xty[l] += x.T @ base.hs[l + 1].reshape(-1, d).double().cpu()
    return [solve_affine(xtx[l], xty[l]) for l in range(L)]


def _bootstrap(nll: torch.Tensor, nll0: torch.Tensor, tau: float, rounds: int, confidence: float,
               seed: int) -> tuple[list[float], list[float]]:
    """Percentile intervals of the score and the continuous score, resampling sequences with replacement."""
    if rounds < 1:
        return [float("nan")] * 2, [float("nan")] * 2
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nll0.numel(), (rounds, nll0.numel()), generator=gen)
    boot = nll[:, idx].sum(-1) / nll0[idx].sum(-1)  # [L, rounds]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    return (torch.quantile((boot > 1 + tau).double().mean(0), q).tolist(),
            torch.quantile(boot.log().mean(0), q).tolist())


def usefulness(model, input_ids, *, tau: float = 0.10, split: bool = False, bootstrap: int = 1000,
               confidence: float = 0.95, seed: int = 0, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
               engine: Engine | None = None, progress: bool = False) -> Usefulness:
    """Loss ratio of every block under linear replacement, the usefulness score and its bootstrap interval."""
    if tau < 0:
        raise AnalysisError(f"tau must be >= 0, got {tau}")
    if split:
        n = len(input_ids)
        if n < 2:
            raise AnalysisError("split=True needs at least 2 sequences (fit on one half, evaluate on the other)")
        fit_eng = Engine(model, input_ids[: n // 2], micro_batch_size=micro_batch_size,
                         cache_budget_mb=cache_budget_mb)
        eval_eng = Engine(model, input_ids[n // 2:], micro_batch_size=micro_batch_size,
                          cache_budget_mb=cache_budget_mb)
    else:
        fit_eng = eval_eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    maps = fit_affine_maps(fit_eng, progress)
    L = eval_eng.n_layers
    base_seq, repl_seq = [], [[] for _ in range(L)]  # per-sequence NLL sums
    for base in tqdm(eval_eng.baselines(), total=eval_eng.num_batches, desc="usefulness", disable=not progress,
                     leave=False):
        base_seq.append(base.nll.double().sum(1).cpu())
        for l in range(L):
            h_last = eval_eng.resume(base, l + 1, maps[l](base.hs[l]))
            repl_seq[l].append(eval_eng.token_nll(h_last, base.ids).double().sum(1).cpu())
    nll0 = torch.cat(base_seq)
    nll = torch.stack([torch.cat(r) for r in repl_seq])  # [L, N]
    eval_tokens = nll0.numel() * (eval_eng.input_ids.shape[1] - 1)
    ratios = nll.sum(1) / nll0.sum()
    useful = ratios > 1 + tau
    score_iv, cont_iv = _bootstrap(nll, nll0, tau, bootstrap, confidence, seed)
    return Usefulness(
        loss_ratios=ratios.tolist(), useful=useful.tolist(), score=useful.double().mean().item(),
        continuous_score=ratios.log().mean().item(), tau=tau, baseline_loss=(nll0.sum() / eval_tokens).item(),
        replaced_losses=(nll.sum(1) / eval_tokens).tolist(), score_interval=score_iv, continuous_interval=cont_iv,
        confidence=confidence, split=split, fit_tokens=fit_eng.input_ids.numel(), eval_tokens=eval_tokens)
