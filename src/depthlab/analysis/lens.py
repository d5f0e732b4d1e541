"""What each block's output already predicts: the logit lens and the tuned lens.

Logit lens (nostalgebraist 2020): decode every block output h_{l+1} with the model's own output layer,
``q_l = softmax(head(final_norm(h_{l+1})))``, and compare it with the final distribution ``p = q_{L-1}``.
Tuned lens (Belrose et al. 2023, arXiv 2303.08112): first map h_{l+1} through a per-layer affine *translator*
``T_l(h) = h + h·A_l + b_l`` (A_l, b_l start at zero, so training starts from the logit lens) trained to minimise
``KL(p ‖ q_l)`` on a fit sample; the last block's translator is the identity (its lens *is* the output).

Per block l and over every position that has a next token, both report the mean of

* ``KL(p ‖ q_l) = Σ_v p_v (log p_v − log q_{l,v})`` in nats (0 for the last block),
* top-1 agreement ``[argmax q_l = argmax p]``,
* the target token's log-probability ``log q_l[y]`` and rank (0 = q_l's top token; ties count against it),
* the entropy ``−Σ_v q_{l,v} log q_{l,v}``.

Everything is read from the engine's cached stream (no extra model pass); the head is applied in row chunks and every
softmax is fp32, so the [tokens, vocab] matrix never exists beyond one chunk. The tuned lens fits on the first half of
the sequences and reports on the second. Its translators are written to a safetensors file (``translators``) tagged
with the model's weights hash, the fit tokens and the training settings, and reused on a rerun when all three match.
The statistics are sums over positions, all-reduced over data-parallel ranks (`depthlab.analysis.engine`); the tuned
lens is not data-parallel (its translators are trained by minibatch steps on the fit positions, not summed).

Training budget (the defaults): ``steps=200`` Adam steps at ``lr=1e-3`` (linear decay to 0), each on
``batch_tokens=256`` fit positions drawn with replacement (seeded), for all translators at once — 200·256·(L−1)
head evaluations forward and backward, with the fit half's block outputs (L·n_fit·d values) held in memory.
Belrose et al. train for 250 steps on 2¹⁸ tokens each; this is far smaller, sized for a CPU, so the tuned lens
reported here is a lower bound on what a longer fit achieves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from depthlab.analysis.engine import Engine, get_engine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError

LENS_CHUNK_TOKENS = 512
"""Rows decoded at once: two fp32 [rows, vocab] log-prob tensors live per chunk (≈200 MB for a 49k vocabulary)."""
STATS = ("kl", "top1_agreement", "target_logprob", "target_rank", "entropy")


@dataclass
class LensReport(Result):
    kl: list[float]
    """Mean KL(final ‖ lens of block l's output) in nats; 0 for the last block."""
    top1_agreement: list[float]
    """Fraction of positions where the lens' top token is the final top token."""
    target_logprob: list[float]
    """Mean log-probability the lens gives the actual next token."""
    target_rank: list[float]
    """Mean rank of the next token under the lens (0 = its top token)."""
    entropy: list[float]
    """Mean entropy of the lens distribution in nats."""
    final_entropy: float
    """Mean entropy of the model's output distribution."""
    tokens: int
    """Positions averaged over (those with a next token)."""


@dataclass
class TunedLens(LensReport):
    logit_kl: list[float]
    """The logit lens' KL on the same held-out positions, for comparison."""
    fit_tokens: int
    """Positions of the fit half the translators were trained on."""
    steps: int
    batch_tokens: int
    lr: float
    translators: str | None
    """The safetensors file holding A_l, b_l (None when not saved)."""
    reused: bool
    """True when the translators were loaded from `translators` instead of trained."""


class Translators(nn.Module):
    """T_l(h) = h + h·A_l + b_l for blocks 0..L-2 (block L-1 maps by identity), in fp32."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_layers - 1, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers - 1, d_model))

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        if layer == self.A.shape[0]:
            return h
        return h + h @ self.A[layer] + self.b[layer]


def _decode(engine: Engine, h: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs of the output layer applied to stream rows h [rows, d] (pre-final-norm)."""
    return torch.log_softmax(engine.stack.final(h.to(engine.dtype)).float(), dim=-1)


class _Accumulator:
    """Per-layer sums of the lens statistics over positions (fp64), divided at the end."""

    def __init__(self, n_layers: int, device: torch.device):
        self.sums = {k: torch.zeros(n_layers, dtype=torch.float64, device=device) for k in STATS}
        self.final_entropy = 0.0
        self.tokens = 0

    def add(self, layer: int, logq: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        q = logq.exp()
        s = self.sums
        s["kl"][layer] += (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).double().sum()
        s["top1_agreement"][layer] += (logq.argmax(-1) == logp.argmax(-1)).double().sum()
        target = logq.gather(1, targets[:, None])
        s["target_logprob"][layer] += target.double().sum()
        s["target_rank"][layer] += (logq > target).sum(-1).double().sum()
        s["entropy"][layer] += -(q * logq).nan_to_num().sum(-1).double().sum()

    def all_sum(self, engine: Engine) -> None:
        """Sum over the data-parallel ranks (a no-op in one process)."""
        self.sums = {k: engine.all_sum(v) for k, v in self.sums.items()}
        total = engine.all_sum(torch.tensor([float(self.final_entropy), self.tokens], dtype=torch.float64))
        self.final_entropy, self.tokens = total[0].item(), int(total[1].item())

    def report(self) -> dict:
        n = max(self.tokens, 1)
        return {**{k: (v / n).cpu().tolist() for k, v in self.sums.items()},
                "final_entropy": float(self.final_entropy) / n,
                "tokens": self.tokens}


@torch.no_grad()
def _lens_stats(engine: Engine, lenses: dict[str, Translators | None], rows=None, progress: bool = False,
                desc: str = "lens") -> dict[str, dict]:
    """Streamed lens statistics for each named lens (None = logit lens) over the sequences in `rows` (all if None)."""
    L, d = engine.n_layers, engine.stack.d_model
    acc = {name: _Accumulator(L, engine.device) for name in lenses}
    for base in tqdm(engine.baselines(), total=engine.num_batches, desc=desc, disable=not progress, leave=False):
        keep = _rows_in(base, rows)
        if keep is None:
            continue
        hs = [h[keep, :-1].reshape(-1, d) for h in base.hs]
        targets = base.ids[keep, 1:].reshape(-1).to(hs[0].device)
        for i in range(0, targets.numel(), LENS_CHUNK_TOKENS):
            chunk = slice(i, i + LENS_CHUNK_TOKENS)
            logp = _decode(engine, hs[L][chunk])
            for name, lens in lenses.items():
                a = acc[name]
                a.tokens += logp.shape[0]
                a.final_entropy += -(logp.exp() * logp).nan_to_num().sum(-1).double().sum()
                for l in range(L):
                    h = hs[l + 1][chunk]
                    logq = logp if l == L - 1 else _decode(engine, h if lens is None else lens(l, h))
                    a.add(l, logq, logp, targets[chunk])
    for a in acc.values():
        a.all_sum(engine)
    return {name: a.report() for name, a in acc.items()}


def _rows_in(base, rows) -> torch.Tensor | None:
    """Indices (within the micro-batch) of the sequences of `rows` (a range of global sequence indices)."""
    idx = torch.arange(base.first, base.first + base.ids.shape[0])
    if rows is not None:
        idx = idx[(idx >= rows.start) & (idx < rows.stop)]
    return None if idx.numel() == 0 else idx - base.first


def logit_lens(model, input_ids, *, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
               engine: Engine | None = None, progress: bool = False) -> LensReport:
    """Per-block KL to the final distribution, top-1 agreement, target log-prob and rank, entropy (logit lens)."""
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    return LensReport(**_lens_stats(eng, {"logit": None}, progress=progress)["logit"])


def tuned_lens(model, input_ids, *, steps: int = 200, batch_tokens: int = 256, lr: float = 1e-3, seed: int = 0,
               translators: str | None = None, micro_batch_size: int = 8, cache_budget_mb: float = 2048.0,
               engine: Engine | None = None, progress: bool = False) -> TunedLens:
    """The lens report of trained affine translators, fitted on the first half of the sequences, reported on the
    second; `translators` names a safetensors file to reuse (when it matches) or write."""
    if steps < 1 or batch_tokens < 1 or not lr > 0:
        raise AnalysisError(f"tuned_lens needs steps >= 1, batch_tokens >= 1 and lr > 0, got steps={steps}, "
                            f"batch_tokens={batch_tokens}, lr={lr}")
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    n = eng.input_ids.shape[0]
    if n < 2:
        raise AnalysisError("tuned_lens needs at least 2 sequences (fit on one half, report on the other)")
    if eng.n_layers < 2:
        raise AnalysisError("tuned_lens needs at least 2 blocks (the last block's lens is the output itself)")
    fit, held = range(n // 2), range(n // 2, n)
    fit_ids = eng.input_ids[: n // 2]
    key = _cache_key(eng, fit_ids, steps, batch_tokens, lr, seed)
    lens = _load(translators, key, eng) if translators else None
    reused = lens is not None
    if lens is None:
        lens = _train(eng, fit, steps, batch_tokens, lr, seed, progress)
        if translators:
            _save(translators, lens, key)
    stats = _lens_stats(eng, {"tuned": lens, "logit": None}, rows=held, progress=progress, desc="tuned lens")
    return TunedLens(**stats["tuned"], logit_kl=stats["logit"]["kl"], fit_tokens=fit_ids[:, 1:].numel(),
                     steps=steps, batch_tokens=batch_tokens, lr=lr,
                     translators=str(translators) if translators else None, reused=reused)


def _train(eng: Engine, fit: range, steps: int, batch_tokens: int, lr: float, seed: int,
           progress: bool) -> Translators:
    """Adam on Σ_l KL(p ‖ q_l) over minibatches of fit positions; the model itself stays frozen."""
    L, d = eng.n_layers, eng.stack.d_model
    states = [[] for _ in range(L + 1)]  # block outputs h_1..h_L of the fit positions, on the model's device
    for base in eng.baselines():
        keep = _rows_in(base, fit)
        if keep is not None:
            for l in range(1, L + 1):
                states[l].append(base.hs[l][keep, :-1].reshape(-1, d))
    hs = [torch.cat(s) if s else None for s in states]
    lens = Translators(L, d).to(hs[L].device)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    gen = torch.Generator().manual_seed(seed)
    params = [p.requires_grad_(False) for p in eng.model.parameters() if p.requires_grad]
    try:
        for _ in tqdm(range(steps), desc="tuned lens fit", disable=not progress, leave=False):
            idx = torch.randint(0, hs[L].shape[0], (batch_tokens,), generator=gen).to(hs[L].device)
            with torch.no_grad():
                logp = _decode(eng, hs[L][idx])
            loss = sum((logp.exp() * (logp - _decode(eng, lens(l, hs[l + 1][idx])))).sum(-1).mean()
                       for l in range(L - 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    return lens.requires_grad_(False)


def _cache_key(eng: Engine, fit_ids: torch.Tensor, steps: int, batch_tokens: int, lr: float, seed: int) -> str:
    from depthlab.loading import weights_hash

    return json.dumps({"weights_sha256": weights_hash(eng.model),
                       "fit_tokens_sha256": hashlib.sha256(fit_ids.cpu().numpy().tobytes()).hexdigest(),
                       "steps": steps, "batch_tokens": batch_tokens, "lr": lr, "seed": seed}, sort_keys=True)


def _load(path: str | Path, key: str, eng: Engine) -> Translators | None:
    """The translators saved at `path` when they were trained for this model, fit sample and settings."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            A, b = f.get_tensor("A"), f.get_tensor("b")
    except (OSError, SafetensorError):  # a damaged cache is retrained, never trusted
        return None
    lens = Translators(eng.n_layers, eng.stack.d_model)
    if A.shape != lens.A.shape or b.shape != lens.b.shape:
        return None
    lens.A.data.copy_(A)
    lens.b.data.copy_(b)
    return lens.to(eng.device).requires_grad_(False)


def _save(path: str | Path, lens: Translators, key: str) -> None:
    from safetensors.torch import save_file

    from depthlab.fileio import atomic_write

    tensors = {"A": lens.A.detach().cpu().contiguous(), "b": lens.b.detach().cpu().contiguous()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"key": key}))
