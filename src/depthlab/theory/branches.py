"""The sparse sub-layers F_l of the simulated residual stack, one class per sparsity mechanism (SPEC §7 a–e).

Every branch is *linear in its input* with fresh Gaussian weights per layer, which is what makes the closed
forms in ``simulate.py`` exact in expectation: with weights independent of the stream, E[x·F] = 0 and E||F||²
depends only on the mask statistics. Shapes: the stream is ``[S, D, T, d]`` (seeds, densities, tokens, width).
Weights are drawn once per seed and shared by all densities (common random numbers), so the densities differ
only in their masks: the comparison across p is far less noisy than with independent draws, and the masks are
nested in p.

``branch.layer(gen)`` draws one layer's weights and returns the function ``u ↦ F(u)`` on normalised inputs.
Normalisation: each branch has the *effective per-entry weight variance* σ_w² of one d×d matrix, so with all
of it active each is statistically a dense linear layer, and E||F_t||²/d = p_var·d·σ_w² when ||u_t||² = d.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MASKS = ("iid", "magnitude", "attention", "routing", "gqa")
Layer = Callable[[torch.Tensor], torch.Tensor]


def _randn(*shape: int, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _linear(weight: torch.Tensor) -> Layer:
    """The token-wise map ``u ↦ u Bᵀ`` with one B ([S, D, d, d]) per seed and density."""
    return lambda u: u @ weight.transpose(-1, -2)


class _Branch:
    """Sizes shared by every mechanism: S seeds (networks side by side), width d, the densities."""

    def __init__(self, seeds: int, d: int, densities: torch.Tensor, sigma_w: float):
        self.seeds, self.d, self.p, self.sigma_w = seeds, d, densities, sigma_w


class IIDMask(_Branch):
    """(a) Bernoulli(p) masks independent of the weights: E||F||²/d = p·d·σ_w² exactly."""

    def layer(self, gen: torch.Generator) -> Layer:
        w = _randn(self.seeds, 1, self.d, self.d, gen=gen, std=self.sigma_w)
        keep = torch.rand(self.seeds, 1, self.d, self.d, generator=gen) < self.p.view(1, -1, 1, 1)
        return _linear(w * keep)


class MagnitudeMask(_Branch):
    """(b) Keep the largest-|w| fraction p of each matrix: the mask is a function of the weights.

    For Gaussian weights this keeps the fraction ``m2(p) = p + 2·z·φ(z)`` of the weight energy, with
    z = Φ⁻¹(1 − p/2): far more than p, so the variance grows with slope m2(p)·d·σ_w², not p·d·σ_w².
    """

    def __init__(self, seeds: int, d: int, densities: torch.Tensor, sigma_w: float):
        super().__init__(seeds, d, densities, sigma_w)
        self.kept = [max(1, round(float(p) * d * d)) for p in densities]

    def layer(self, gen: torch.Generator) -> Layer:
        w = _randn(self.seeds, 1, self.d, self.d, gen=gen, std=self.sigma_w)
        ranked = w.abs().flatten(1).sort(dim=1, descending=True).values  # [S, d²]
        thresholds = ranked[:, [k - 1 for k in self.kept]]  # [S, D]: k-th largest |w| per seed and density
        return _linear(w * (w.abs() >= thresholds[:, :, None, None]))

    @staticmethod
    def energy_fraction(p: torch.Tensor) -> torch.Tensor:
        """E[z²·1{|z| > t}] for z ~ N(0,1) and P(|z| > t) = p: the weight energy a magnitude mask keeps."""
        p = p.double()
        z = torch.special.ndtri(1 - p / 2)
        kept = p + 2 * z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        return torch.where(p >= 1, torch.ones_like(p), kept)


class Routing(_Branch):
    """(d) Top-k of E experts per token (p = k/E), chosen by a random linear router on the normalised input.

    The branch is a two-matrix linear map whose H hidden units are split into E experts of equal size; a token
    uses the hidden units of its k experts (unit gates, dropless). With W1 ~ N(0, 1/d) and W2 ~ N(0, σ_w²·d/H)
    the product has per-entry variance σ_w², and E||F||²/d = (k/E)·d·σ_w² exactly because the router is
    independent of W1, W2. The routing decision is piecewise constant in the input, so the Jacobian is the
    chosen experts' linear map.
    """

    def __init__(self, seeds: int, d: int, densities: torch.Tensor, sigma_w: float, experts: int):
        super().__init__(seeds, d, densities, sigma_w)
        self.experts = experts
        self.unit = -(-d // experts)  # hidden units per expert; H = E·unit >= d
        self.hidden = experts * self.unit
        self.top_k = torch.round(densities * experts).long().view(1, -1, 1, 1)

    def layer(self, gen: torch.Generator) -> Layer:
        S, d, H = self.seeds, self.d, self.hidden
        w1 = _randn(S, 1, H, d, gen=gen, std=d ** -0.5)
        w2 = _randn(S, 1, d, H, gen=gen, std=self.sigma_w * (d / H) ** 0.5)
        router = _randn(S, 1, self.experts, d, gen=gen)

        def forward(u: torch.Tensor) -> torch.Tensor:
            logits = u.detach() @ router.transpose(-1, -2)  # [S, D, T, E]
            rank = logits.argsort(-1, descending=True).argsort(-1)
            units = (rank < self.top_k).repeat_interleave(self.unit, dim=-1)  # expert → its hidden units
            return ((u @ w1.transpose(-1, -2)) * units) @ w2.transpose(-1, -2)

        return forward


def _multi_head(rows: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor) -> Layer:
    """Attention with fixed rows [S, ·, H, T, T], per-head value maps [S, ·, H, dh, d], output map wo."""

    def forward(u: torch.Tensor) -> torch.Tensor:
        heads = rows @ torch.einsum("sptj,sphcj->sphtc", u, wv)  # [S, D, H, T, dh]
        S, D, H, T, dh = heads.shape
        return heads.permute(0, 1, 3, 2, 4).reshape(S, D, T, H * dh) @ wo.transpose(-1, -2)

    return forward


def softmax_rows(logits: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """softmax(β·logits) over the last axis; β = inf gives one-hot rows at the argmax (support 1)."""
    hard = torch.isinf(beta)
    soft = torch.softmax(logits * torch.where(hard, 0.0, beta), dim=-1)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.where(hard, one_hot, soft)


def calibrate_beta(target: torch.Tensor, tokens: int, gen: torch.Generator, rows: int = 4096) -> torch.Tensor:
    """Inverse temperature β per target so that softmax(β·z) rows of ``tokens`` N(0,1) logits have mean Σ_j
    a_j² = target (effective support 1/target). Bisection on log β over a fixed calibration sample
    (deterministic in gen)."""
    z = torch.randn(rows, tokens, generator=gen, dtype=torch.float64)
    lo = torch.full(target.shape, -12.0, dtype=torch.float64)
    hi = torch.full(target.shape, 12.0, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        a = torch.softmax(z[None] * mid.exp()[:, None, None], dim=-1)
        too_broad = (a * a).sum(-1).mean(-1) < target.double()
        lo, hi = torch.where(too_broad, mid, lo), torch.where(too_broad, hi, mid)
    beta = ((lo + hi) / 2).exp()
    beta = torch.where(target >= 1, math.inf, beta)
    return torch.where(target <= 1 / tokens, 0.0, beta).to(torch.float32)


class Attention(_Branch):
    """(c) Single-head attention whose rows have effective support 1/p: Σ_s a_ts² = p on average.

    Rows are softmax(β·z) of N(0,1) logits independent of the stream, with β calibrated per density; the value
    and output maps multiply to a d×d map of per-entry std σ_w. At the first block (independent tokens)
    E||F||²/d = p·d·σ_w² exactly; deeper, the shared value map correlates the token streams and the closed
    form is only a first approximation. The position-summed Jacobian is (Σ_t a_ts)·W, with
    E[(Σ_t a_ts)²] = p + (T−1)/T.
    """

    def __init__(self, seeds: int, d: int, densities: torch.Tensor, sigma_w: float, tokens: int,
                 gen: torch.Generator):
        super().__init__(seeds, d, densities, sigma_w)
        self.tokens = tokens
        self.beta = calibrate_beta(densities, tokens, gen).view(1, -1, 1, 1, 1)

    def layer(self, gen: torch.Generator) -> Layer:
        S, T, d = self.seeds, self.tokens, self.d
        rows = softmax_rows(torch.randn(S, 1, 1, T, T, generator=gen), self.beta)
        wv = _randn(S, 1, 1, d, d, gen=gen, std=d ** -0.5)
        return _multi_head(rows, wv, _randn(S, 1, d, d, gen=gen, std=self.sigma_w))


class GQA(_Branch):
    """(e) Multi-head attention where groups of G = 1/p query heads share one key/value head.

    Every query head has its own attention rows (effective support ``support``); the G heads of a group read
    the same value vectors. Density p = n_kv_heads / n_heads. The output map's columns are independent per
    head, so sharing values leaves E||F||² and the expected Jacobian unchanged: the closed form does not
    depend on G.
    """

    def __init__(self, seeds: int, d: int, densities: torch.Tensor, sigma_w: float, tokens: int, heads: int,
                 support: float, gen: torch.Generator):
        super().__init__(seeds, d, densities, sigma_w)
        self.tokens, self.heads = tokens, heads
        groups = torch.round(1 / densities).long()
        head = torch.arange(heads)
        self.kv_index = (head[None, :] // groups[:, None]) * groups[:, None]  # [D, H]: the kv head each reads
        self.beta = calibrate_beta(torch.tensor([1 / support]), tokens, gen).view(1, 1, 1, 1, 1)

    def layer(self, gen: torch.Generator) -> Layer:
        S, T, d, H = self.seeds, self.tokens, self.d, self.heads
        rows = softmax_rows(torch.randn(S, 1, H, T, T, generator=gen), self.beta)
        wv = _randn(S, H, d // H, d, gen=gen, std=d ** -0.5)[:, self.kv_index]  # [S, D, H, dh, d]
        return _multi_head(rows, wv, _randn(S, 1, d, d, gen=gen, std=self.sigma_w))
