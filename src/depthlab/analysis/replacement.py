"""Usefulness by linear replacement (SPEC §5.4), fitted and evaluated on different tokens.

For each block l an affine map ``Y ≈ X·W + b`` is fitted by least squares from X = h_l to Y = h_{l+1} (fp64 normal
equations accumulated in one streaming pass), the block is replaced by ``x ↦ x·W + b`` — applied as ``x @ W``, *not*
``nn.Linear(weight=W)`` which would apply Wᵀ (defect 1 of prior code) — and the LM loss is measured by resuming the
stack from the cached h_l: ratio_l = L_l / L_0. A block is useful when ratio_l > 1 + τ.

**Fit and evaluation are separate samples.** Evaluated on its own fit tokens, a least-squares map looks better than
it is: its in-sample residual is (1 − (d+1)/n) times the true one for n tokens and d + 1 coefficients per output,
so with n near d + 1 every block looks replaceable (ratio ≈ 1). Fitting needs only the baseline states and the
streaming sums [X,1]ᵀ[X,1], [X,1]ᵀY (cheap); evaluation needs L(L+1)/2 resumed block runs (expensive). So the maps
are fitted on a large sample (`fit_ids`) and evaluated on a smaller, disjoint one (`input_ids`). Without `fit_ids`
the sample is cross-fitted: its sequences are split into K folds and each fold is evaluated with maps fitted on the
other K − 1. A result whose maps saw fewer than ``MIN_FIT_TOKENS_PER_COEF``·(d+1) tokens is flagged
``reliable=False`` with the reason, and the commands that select blocks from it refuse it.

**Intervals include the fit's variance.** The estimate has two independent errors: the evaluation sample's and the
fit sample's. The first is resampled directly (bootstrap over evaluation sequences, maps fixed). The second is
measured by a delete-a-group jackknife: the fit sequences are split into K groups, each block's map is refitted
without each group in turn (a subtraction of that group's normal equations, no new pass), and each refit is
evaluated on a small probe of the evaluation sample; the jackknife covariance of the per-block log ratios over the
refits, (G−1)/G · Σ_g (r_g − r̄)(r_g − r̄)ᵀ, is the fit variance. Every bootstrap round adds a Gaussian draw with that
covariance to its resampled log ratios (both parts widened for their few degrees of freedom, as a t-interval is over
a z-interval); the intervals are percentiles over the rounds. Measured coverage: docs/metrics.md.

Cost: one baseline pass over the fit sample, one over the evaluation sample, L(L+1)/2 block runs and L LM-head
passes per evaluation token, and G times that on the probe sequences.

**Data parallel** (`depthlab.analysis.engine`): each rank sums the normal equations of its share of the fit
sequences and evaluates its share of the evaluation sequences; the sums are all-reduced and the per-sequence NLL
sums gathered, so the bootstrap resamples the same global vector with the same generator on every rank. Groups,
folds and the probe are defined by global sequence index, as in one process; the ranks share out the G jackknife
refits (each on the whole probe). Every field equals one process's, up to the order of the fp64 additions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.analysis.engine import Engine, check_data_parallel, get_engine, validate_ids
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError

MIN_FIT_TOKENS_PER_COEF = 10
"""Below this many fit tokens per coefficient (d + 1) a result is unreliable: the held-out excess error of a
least-squares map, about (d+1)/n of the residual, is then over 10% and the fit variance dominates the interval."""
OVERLAP_TOKENS = 64
"""A fit and an evaluation sequence overlap when they share a run of this many tokens (or of the shorter length)."""


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

    The system is Jacobi-scaled (huge outlier features of the stream become harmless), then solved by Cholesky when
    it is well conditioned (the unique least-squares fit, ~10x faster) and otherwise by a minimum-norm solve
    (gelsd), which stays stable for near-singular systems and fewer tokens than d.
    """
    scale = xtx.diagonal().clamp_min(1e-300).rsqrt()
    a = xtx * scale[:, None] * scale[None, :]
    factor, info = torch.linalg.cholesky_ex(a)
    pivots = factor.diagonal()
    if info == 0 and pivots.min() ** 2 > 1e-10 * pivots.max() ** 2:  # condition number below ~1e10
        z = torch.cholesky_solve(xty * scale[:, None], factor)
    else:
        z = torch.linalg.lstsq(a, xty * scale[:, None], driver="gelsd").solution
    coef = z * scale[:, None]
    return AffineMap(coef[:-1], coef[-1])


@dataclass
class NormalEquations:
    """Per-group sums [x,1]ᵀ[x,1] and [x,1]ᵀy of every block (fp64); a map without some groups is a subtraction."""

    xtx: torch.Tensor
    """[G, L, d+1, d+1]."""
    xty: torch.Tensor
    """[G, L, d+1, d]."""
    tokens: list[int]
    """Fit tokens in each group."""

    def maps(self, without: tuple[int, ...] = ()) -> list[AffineMap]:
        keep = [g for g in range(len(self.tokens)) if g not in without]
        xtx, xty = self.xtx[keep].sum(0), self.xty[keep].sum(0)
        return [solve_affine(xtx[l], xty[l]) for l in range(xtx.shape[0])]

    def fit_tokens(self, without: tuple[int, ...] = ()) -> int:
        return sum(n for g, n in enumerate(self.tokens) if g not in without)


def group_of(n: int, groups: int) -> list[int]:
    """Contiguous groups of n sequences, sizes differing by at most one: sequence i → group i·G // n."""
    return [i * groups // n for i in range(n)]


def normal_equations(engine: Engine, groups: int, progress: bool = False) -> NormalEquations:
    """One streaming pass over the engine's baselines, summing each block's normal equations per sequence group
    (groups of global sequence indices; summed over data-parallel ranks)."""
    L, d = engine.n_layers, engine.stack.d_model
    xtx = torch.zeros(groups, L, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(groups, L, d + 1, d, dtype=torch.float64)
    tokens = [0] * groups
    owner = torch.tensor(group_of(engine.input_ids.shape[0], groups))
    for base in tqdm(engine.baselines(), total=engine.num_batches, desc="usefulness fit", disable=not progress,
                     leave=False):
        rows = owner[base.first:base.first + base.ids.shape[0]]
        for g in rows.unique().tolist():
            sel = (rows == g).nonzero().flatten().to(base.ids.device)
            tokens[g] += sel.numel() * base.ids.shape[1]
            for l in range(L):
                x = base.hs[l][sel].reshape(-1, d).double().cpu()
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
                xtx[g, l] += x.T @ x
                xty[g, l] += x.T @ base.hs[l + 1][sel].reshape(-1, d).double().cpu()
    tokens = engine.all_sum(torch.tensor(tokens, dtype=torch.float64)).long().tolist()
    return NormalEquations(engine.all_sum(xtx), engine.all_sum(xty), tokens)


def fit_affine_maps(engine: Engine, progress: bool = False) -> list[AffineMap]:
    """Least-squares maps h_l → h_{l+1} of every block on all of the engine's tokens."""
    return normal_equations(engine, 1, progress).maps()


@dataclass
class Usefulness(Result):
    loss_ratios: list[float]
    """L_l / L_0: LM loss with block l linearly replaced over the intact loss, on the evaluation sample."""
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
    """Interval of the score at `confidence`, over evaluation resampling and fit variance (module docstring)."""
    continuous_interval: list[float]
    ratio_intervals: list[list[float]]
    """Per-block interval of the loss ratio, same method."""
    undecided: list[int]
    """Blocks whose ratio interval contains 1 + tau: the samples cannot tell whether they are useful (more evaluation
    tokens narrow the interval). The other blocks' `useful` holds at `confidence`."""
    fit_std: list[float]
    """Jackknife standard deviation of each block's log loss ratio due to the fit sample alone (NaN with
    bootstrap=0, which skips the jackknife)."""
    confidence: float
    cross_fitted: bool
    """True when the maps were fitted on other folds of the evaluation sample (no separate fit sample given)."""
    fit_tokens: int
    """Tokens each map was fitted on (the smallest over folds when cross-fitted)."""
    fit_tokens_per_coef: float
    """fit_tokens / (d + 1)."""
    eval_tokens: int
    reliable: bool
    """False when fit_tokens < MIN_FIT_TOKENS_PER_COEF·(d+1): the ratios are then dominated by the fit."""
    reason: str | None
    """Why the result is unreliable, and the fix; None when reliable."""


def require_reliable(result: Usefulness | dict, what: str) -> None:
    """Raise a one-line AnalysisError when `what` (e.g. "prune --drop auto") would act on unreliable scores."""
    reliable = result["reliable"] if isinstance(result, dict) else result.reliable
    if reliable is False:
        reason = result["reason"] if isinstance(result, dict) else result.reason
        raise AnalysisError(f"{what} refuses to select blocks from unreliable usefulness scores: {reason}")


def usefulness(model, input_ids, *, fit_ids=None, tau: float = 0.10, folds: int = 5, probe_sequences: int = 2,
               bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, disjoint: bool = True,
               micro_batch_size: int = 8, cache_budget_mb: float = 2048.0, engine: Engine | None = None,
               progress: bool = False) -> Usefulness:
    """Loss ratio of every block under linear replacement, the usefulness score and intervals (module docstring).

    fit_ids: the sample [N_fit, T_fit] the maps are fitted on; None cross-fits `input_ids` over `folds` folds.
    folds: groups of fit sequences for the jackknife (and the cross-fitting folds); at least 3.
    probe_sequences: evaluation sequences on which the jackknife refits are evaluated (each costs one more
    evaluation of those sequences per group).
    bootstrap: resampling rounds of the intervals; 0 computes no intervals and skips the fit-variance jackknife
    (the point estimates only, at the cost of one pass over the fit sample and one evaluation).
    disjoint: refuse a `fit_ids` that shares a run of OVERLAP_TOKENS tokens with `input_ids`.
    """
    if tau < 0:
        raise AnalysisError(f"tau must be >= 0, got {tau}")
    if folds < 3:
        raise AnalysisError(f"folds must be >= 3 (the fit-variance jackknife needs them), got {folds}")
    if probe_sequences < 1:
        raise AnalysisError(f"probe_sequences must be >= 1, got {probe_sequences}")
    eval_eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    ids = eval_eng.input_ids
    N, d = ids.shape[0], eval_eng.stack.d_model
    if fit_ids is None:
        if N < 3:
            raise AnalysisError(f"usefulness without fit_ids cross-fits the sample over folds of sequences and "
                                f"needs at least 3 sequences, got {N}; pass fit_ids (a separate fit sample)")
        K = min(folds, N)
        neq = normal_equations(eval_eng, K, progress)
        excluded = [(g,) for g in group_of(N, K)]  # each sequence is evaluated by maps fitted without its fold
        probe_rows = min(probe_sequences, excluded.count((0,)))
        refits = [(0, g) for g in range(1, K)]  # probe in fold 0: refits drop fold 0 and one more group
    else:
        fit = validate_ids(fit_ids, eval_eng.stack)
        if fit.shape[0] < 3:
            raise AnalysisError(f"the fit sample needs at least 3 sequences (for the fit-variance jackknife), "
                                f"got {fit.shape[0]}")
        if disjoint:
            check_disjoint(fit, ids)
        K = min(folds, fit.shape[0])
        neq = normal_equations(fit_engine(model, fit, eval_eng, micro_batch_size), K, progress)
        excluded = [()] * N
        probe_rows = min(probe_sequences, N)
        refits = [(g,) for g in range(K)]
    maps = {key: neq.maps(key) for key in dict.fromkeys(excluded[s] for s in eval_eng.sequences)}
    nll0, nll = (eval_eng.gather_sequences(x) for x in _evaluate(eval_eng, maps, excluded, progress))
    if bootstrap:  # the jackknife feeds only the intervals and fit_std
        probe = Engine(model, ids[:probe_rows], micro_batch_size=micro_batch_size, cache_budget_mb=cache_budget_mb)
        fit_dev = _jackknife(probe, neq, refits, eval_eng, progress)  # [G, L]
    else:
        fit_dev = torch.full((1, eval_eng.n_layers), float("nan"), dtype=torch.float64)

    eval_tokens = N * (ids.shape[1] - 1)
    ratios = nll.sum(1) / nll0.sum()
    useful = ratios > 1 + tau
    iv = _intervals(nll, nll0, fit_dev, tau, bootstrap, confidence, seed)
    fit_tokens = min(neq.fit_tokens(key) for key in dict.fromkeys(excluded))
    reliable, reason = fit_reliability(fit_tokens, d)
    return Usefulness(
        loss_ratios=ratios.tolist(), useful=useful.tolist(), score=useful.double().mean().item(),
        continuous_score=ratios.log().mean().item(), tau=tau, baseline_loss=(nll0.sum() / eval_tokens).item(),
        replaced_losses=(nll.sum(1) / eval_tokens).tolist(), score_interval=iv[0], continuous_interval=iv[1],
        ratio_intervals=iv[2], undecided=[l for l, (lo, hi) in enumerate(iv[2]) if lo <= 1 + tau <= hi],
        fit_std=iv[3], confidence=confidence, cross_fitted=fit_ids is None,
        fit_tokens=fit_tokens, fit_tokens_per_coef=fit_tokens / (d + 1), eval_tokens=eval_tokens,
        reliable=reliable, reason=reason)


def fit_reliability(fit_tokens: int, d: int) -> tuple[bool, str | None]:
    """(reliable, reason): the sample-size rule for a d → d affine map fitted on `fit_tokens` tokens."""
    if fit_tokens >= MIN_FIT_TOKENS_PER_COEF * (d + 1):
        return True, None
    return False, (f"each affine map was fitted on {fit_tokens} tokens, {fit_tokens / (d + 1):.1f} per coefficient "
                   f"(d+1 = {d + 1}); at least {MIN_FIT_TOKENS_PER_COEF * (d + 1)} are needed: give a larger fit "
                   f"sample (fit_ids, or --fit-samples/--fit-seq-len)")


def fit_engine(model, fit_ids: torch.Tensor, eval_eng: Engine, micro_batch_size: int) -> Engine:
    """An engine over the fit sample (nothing cached: one pass), split over the data-parallel ranks of `eval_eng`."""
    check_data_parallel((), eval_eng.input_ids.shape[0], eval_eng.world, fit_ids.shape[0])
    return Engine(model, fit_ids, micro_batch_size=micro_batch_size, cache_budget_mb=0,
                  data_parallel=eval_eng.world > 1)


def check_disjoint(fit_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Refuse fit and evaluation samples that share a run of OVERLAP_TOKENS tokens (or of the shorter length)."""
    k = min(OVERLAP_TOKENS, fit_ids.shape[1], input_ids.shape[1])

    def runs(x: torch.Tensor) -> set[bytes]:
        return {bytes(r.numpy()) for r in x.long().unfold(1, k, 1).reshape(-1, k)}

    if runs(fit_ids) & runs(input_ids):
        raise AnalysisError(f"the fit sample overlaps the evaluation sample (they share a run of {k} tokens); "
                            "draw them from disjoint text, or pass disjoint=False")


def _replace(by_key: dict[tuple, list[AffineMap]], groups: dict[tuple, torch.Tensor], l: int,
             h: torch.Tensor) -> torch.Tensor:
    """Block l's replacement on stream h, each row group by the maps of its key."""
    if len(groups) == 1:
        return by_key[next(iter(groups))][l](h)
    y = torch.empty_like(h)
    for key, rows in groups.items():
        y[rows] = by_key[key][l](h[rows])
    return y


def _evaluate(eng: Engine, maps: dict[tuple, list[AffineMap]], excluded: list[tuple], progress: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence NLL sums of the engine's sequences: intact [n] and with each block replaced by its sequence's
    map [L, n]; `excluded` is indexed by global sequence."""
    L = eng.n_layers
    base_seq, repl_seq = [], [[] for _ in range(L)]
    for base in tqdm(eng.baselines(), total=eng.num_batches, desc="usefulness", disable=not progress, leave=False):
        keys = excluded[base.first:base.first + base.ids.shape[0]]
        groups = {key: torch.tensor([i for i, k in enumerate(keys) if k == key], device=base.ids.device)
                  for key in dict.fromkeys(keys)}
        base_seq.append(base.nll.double().sum(1).cpu())
        runs = [(l + 1, _replace(maps, groups, l, base.hs[l]), None) for l in range(L)]
        for l, h_last in enumerate(eng.resume_many(base, runs)):
            repl_seq[l].append(eng.token_nll(h_last, base.ids).double().sum(1).cpu())
    return torch.cat(base_seq), torch.stack([torch.cat(r) for r in repl_seq])


def _jackknife(probe: Engine, neq: NormalEquations, refits: list[tuple], eval_eng: Engine,
               progress: bool) -> torch.Tensor:
    """Scaled jackknife deviations [G, L] of the per-block log ratios on the probe with the maps refitted without
    each group of `refits`: sqrt((G−1)/G)·(r_g − r̄), so that their Gram matrix is the jackknife covariance.

    Data-parallel ranks share out the refits (rank r evaluates refits r, r + W, ...); the others add zeros."""
    G = len(refits)
    r = torch.zeros(G, eval_eng.n_layers, dtype=torch.float64)
    mine = range(eval_eng.rank, G, eval_eng.world)
    for g in tqdm(mine, desc="usefulness fit variance", disable=not progress, leave=False):
        nll0, nll = _evaluate(probe, {(): neq.maps(refits[g])}, [()] * probe.input_ids.shape[0], False)
        r[g] = (nll.sum(1) / nll0.sum()).log()
    r = eval_eng.all_sum(r)
    return (r - r.mean(0)) * ((G - 1) / G) ** 0.5


def _intervals(nll: torch.Tensor, nll0: torch.Tensor, fit_dev: torch.Tensor, tau: float, rounds: int,
               confidence: float, seed: int) -> tuple[list[float], list[float], list[list[float]], list[float]]:
    """Percentile intervals of the score, the continuous score and each ratio: each round resamples evaluation
    sequences with replacement and adds a Gaussian fit perturbation with the jackknife covariance.

    Both parts are widened for their few degrees of freedom, as a t-interval is over a z-interval: the resampled
    deviations from the estimate by sqrt(N/(N−1))·t_{N−1}/z (N evaluation sequences; a bootstrap of a mean has
    variance (N−1)/N·s²/N), the fit part by t_{G−1}/z (G jackknife groups).
    """
    from scipy.stats import norm, t

    fit_std = fit_dev.pow(2).sum(0).sqrt().tolist()
    L, N, G = nll.shape[0], nll0.numel(), fit_dev.shape[0]
    if rounds < 1:
        nan = [float("nan")] * 2
        return nan, nan, [nan] * L, fit_std
    p = (1 + confidence) / 2
    widen_eval = (N / (N - 1)) ** 0.5 * t.ppf(p, N - 1) / norm.ppf(p) if N > 1 else 1.0
    widen_fit = t.ppf(p, G - 1) / norm.ppf(p)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (rounds, N), generator=gen)
    z = torch.randn(rounds, G, generator=gen, dtype=torch.float64)
    point = (nll.sum(1) / nll0.sum()).log()[:, None]
    boot = (nll[:, idx].sum(-1) / nll0[idx].sum(-1)).log()  # [L, rounds]
    logs = point + widen_eval * (boot - point) + widen_fit * (z @ fit_dev).T
    q = torch.tensor([1 - p, p], dtype=torch.float64)
    useful = (logs > torch.log1p(torch.tensor(tau, dtype=torch.float64))).double().mean(0)
    return (torch.quantile(useful, q).tolist(), torch.quantile(logs.mean(0), q).tolist(),
            torch.quantile(logs, q, dim=1).T.exp().tolist(), fit_std)
