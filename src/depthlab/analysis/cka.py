"""Linear CKA between every layer of one model and every layer of another, streamed over tokens.

For the states X [n, d_a] of model A at h_i and Y [n, d_b] of model B at h_j on the same n token positions,
linear centred kernel alignment (Kornblith et al. 2019) is

    CKA(X, Y) = ||X̃ᵀỸ||²_F / (||X̃ᵀX̃||_F · ||ỸᵀỸ||_F),     X̃ = X − 1·mean(X),  Ỹ = Y − 1·mean(Y),

which equals the token-space form tr(K̃_X K̃_Y) / (||K̃_X||_F ||K̃_Y||_F) with K = XXᵀ — but the feature-space form
needs only sums over tokens: Σx, Σy, XᵀX, YᵀY and XᵀY, each accumulated in fp64 over micro-batches
(X̃ᵀỸ = XᵀY − n·x̄ȳᵀ). No n×n token matrix is formed. Memory is bounded by streaming one layer of A at a time
against all layers of B: (L_b+1)·d_a·d_b cross sums, plus the (L+1)·d² second moments of each model; each engine's
baselines are re-read once per layer of A (from its cache when it fits). CKA is invariant to orthogonal maps and
isotropic scaling of either side, so models of different widths compare directly; 1 means the same geometry.
Both engines must hold the same token ids (one tokenizer), since CKA compares states position by position.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from depthlab.analysis.engine import Engine
from depthlab.errors import AnalysisError


def _moments(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Per state h_0..h_L: the sum over tokens [L+1, d] and the second moment XᵀX [L+1, d, d], fp64."""
    L, d = engine.n_layers, engine.stack.d_model
    s = torch.zeros(L + 1, d, dtype=torch.float64)
    m = torch.zeros(L + 1, d, d, dtype=torch.float64)
    for base in engine.baselines():
        for l, h in enumerate(base.hs):
            x = h.reshape(-1, d).double().cpu()
            s[l] += x.sum(0)
            m[l] += x.T @ x
    return s, m


def linear_cka(a: Engine, b: Engine, progress: bool = False) -> list[list[float]]:
    """CKA[i][j] between state h_i of engine `a`'s model and h_j of engine `b`'s, over their shared tokens."""
    if not torch.equal(a.input_ids, b.input_ids):
        raise AnalysisError("linear CKA compares states token by token: both models need the same token ids "
                            "(the same tokenizer)")
    if a.micro_batch_size != b.micro_batch_size:
        raise AnalysisError("linear CKA needs both engines to stream the same micro-batches")
    n = a.input_ids.numel()
    sa, ma = _moments(a)
    sb, mb = _moments(b)
    ca = ma - torch.einsum("li,lj->lij", sa, sa) / n  # X̃ᵀX̃ per layer
    cb = mb - torch.einsum("li,lj->lij", sb, sb) / n
    na, nb = ca.flatten(1).norm(dim=1), cb.flatten(1).norm(dim=1)
    La, Lb = a.n_layers + 1, b.n_layers + 1
    out = torch.zeros(La, Lb, dtype=torch.float64)
    for i in tqdm(range(La), desc="cka", disable=not progress, leave=False):
        cross = torch.zeros(Lb, a.stack.d_model, b.stack.d_model, dtype=torch.float64)
        for base_a, base_b in zip(a.baselines(), b.baselines()):
            x = base_a.hs[i].reshape(-1, a.stack.d_model).double().cpu()
            for j, h in enumerate(base_b.hs):
                cross[j] += x.T @ h.reshape(-1, b.stack.d_model).double().cpu()
        cross -= torch.einsum("i,lj->lij", sa[i], sb) / n
        denom = na[i] * nb
        out[i] = torch.where(denom > 0, cross.flatten(1).norm(dim=1) ** 2 / denom.clamp_min(1e-300), torch.nan)
    return out.tolist()
