"""Which sub-layer of each block matters: attention vs MLP/MoE removal, affine replacement, and causal effects.

For every block l and each of its two branches b ∈ {attn, ffn} (the MLP or MoE sub-layer):

* ``removed[b][l] = L(branch b of block l outputs 0) / L_0`` — the stack is resumed from the cached h_l with that
  one branch zeroed (the engine's ``Drop``), so no extra baseline pass; a ratio near 1 means the branch is removable
  (He et al., "What matters in transformers? Not all attention is needed", 2024);
* ``affine[b][l] = L(sub-layer replaced by x ↦ x·W + b) / L_0`` — the sub-layer module (attention / MLP / MoE) is
  replaced by the least-squares affine map of its own input to its own output, fitted in fp64 on the separate fit
  sample `analyze` passes (as for usefulness; the evaluation sample itself only when none is given) — the usefulness
  test of SPEC §5.4, one sub-layer at a time; any norm the block applies to the sub-layer's output afterwards
  (OLMo-2, Peri-LN) still runs. Below 10·(d+1) fit tokens the result is flagged ``reliable: false``;
* ``causal[b][s][l] = Σ_tok ||Δ̄_l − Δ_l|| / Σ_tok ||Δ_l||`` for l > s — how much removing branch b of block s changes
  every later block's update Δ_l = h_{l+1} − h_l (the causal effect of SPEC §5.5 with a branch instead of a block
  skipped; NaN where l ≤ s). The removal run that gives ``removed`` gives this at no extra cost.

Every number is a ratio of sums over tokens, so data-parallel ranks (`depthlab.analysis.engine`) all-reduce the
normal equations of their share of the fit sample and the loss and norm sums of their share of the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlab.analysis.engine import Drop, Engine, _first_tensor, get_engine, validate_ids
from depthlab.analysis.replacement import AffineMap, check_disjoint, fit_engine, fit_reliability, solve_affine
from depthlab.analysis.results import Result
from depthlab.errors import AnalysisError

BRANCHES = ("attn", "ffn")


@dataclass
class BranchEffects(Result):
    attn_removed: list[float]
    """Loss ratio L/L_0 with block l's attention branch removed."""
    ffn_removed: list[float]
    """Loss ratio with block l's MLP (or MoE) branch removed."""
    attn_affine: list[float]
    """Loss ratio with block l's attention replaced by its least-squares affine map."""
    ffn_affine: list[float]
    """Loss ratio with block l's MLP/MoE replaced by its least-squares affine map."""
    attn_causal: list[list[float]]
    """C[s][l]: relative change of block l's update when block s's attention is removed (NaN for l <= s)."""
    ffn_causal: list[list[float]]
    """The same with block s's MLP/MoE branch removed."""
    attn_causal_mean: list[float]
    """Mean over l > s of attn_causal[s][l] (NaN for the last block)."""
    ffn_causal_mean: list[float]
    baseline_loss: float
    tokens: int
    fit_tokens: int
    """Tokens each affine map was fitted on (the separate fit sample when one was given, else the sample itself)."""
    reliable: bool
    """False when the affine fits are under-determined (fewer than 10·(d+1) fit tokens): the affine columns then
    measure the sample, not the model (the removal columns do not depend on it)."""
    reason: str | None


def sublayer(engine: Engine, layer: int, name: str) -> torch.nn.Module:
    """The attention ("attn") or MLP/MoE ("ffn") module of block `layer` (before any post-sub-layer norm)."""
    module = engine.stack.sublayer(layer, name)
    if module is None:
        raise AnalysisError(f"cannot locate the {name} sub-layer of block {layer} "
                            f"({type(engine.stack.blocks[layer]).__name__})")
    return module


def _input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_first(out, y):
    return (y, *out[1:]) if isinstance(out, tuple) else y


def _run_with_hook(engine: Engine, base, layer: int, h: torch.Tensor, module, hook) -> torch.Tensor:
    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        return engine.run_block(base, layer, h)
    finally:
        handle.remove()


@torch.no_grad()
def _fit_sublayers(engine: Engine, progress: bool) -> dict[str, list[AffineMap]]:
    """fp64 normal equations of every sub-layer's input → output over the sample (summed over data-parallel
    ranks), solved as in usefulness."""
    L, d = engine.n_layers, engine.stack.d_model
    xtx = {b: torch.zeros(L, d + 1, d + 1, dtype=torch.float64) for b in BRANCHES}
    xty = {b: torch.zeros(L, d + 1, d, dtype=torch.float64) for b in BRANCHES}

    def accumulate(name, layer):
        def hook(module, args, kwargs, out):
            x = _input(args, kwargs).reshape(-1, d).double().cpu()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            xtx[name][layer] += x.T @ x
            xty[name][layer] += x.T @ _first_tensor(out).reshape(-1, d).double().cpu()
        return hook

    for base in tqdm(engine.baselines(), total=engine.num_batches, desc="branch fit", disable=not progress,
                     leave=False):
        for l in range(L):
            mods = {b: sublayer(engine, l, b) for b in BRANCHES}
            handles = [mods[b].register_forward_hook(accumulate(b, l), with_kwargs=True) for b in BRANCHES]
            try:
                engine.run_block(base, l, base.hs[l])
            finally:
                for h in handles:
                    h.remove()
    xtx, xty = ({b: engine.all_sum(sums[b]) for b in BRANCHES} for sums in (xtx, xty))
    return {b: [solve_affine(xtx[b][l], xty[b][l]) for l in range(L)] for b in BRANCHES}


def branch_effects(model, input_ids, *, fit_ids=None, disjoint: bool = True, micro_batch_size: int = 8,
                   cache_budget_mb: float = 2048.0, engine: Engine | None = None,
                   progress: bool = False) -> BranchEffects:
    """Loss ratios with each block's attention / MLP removed or made affine, and the branch-removal causal effects.

    fit_ids: the sample the affine maps are fitted on (as for `usefulness`; `disjoint` refuses one that overlaps
    `input_ids`); None fits them on `input_ids` itself, which is flagged unreliable below 10·(d+1) tokens.
    """
    eng = get_engine(model, input_ids, engine, micro_batch_size, cache_budget_mb)
    L = eng.n_layers
    if fit_ids is None:
        fit_eng = eng
    else:
        fit = validate_ids(fit_ids, eng.stack)
        if disjoint:
            check_disjoint(fit, eng.input_ids)
        fit_eng = fit_engine(model, fit, eng, micro_batch_size)
    maps = _fit_sublayers(fit_eng, progress)
    fit_tokens = fit_eng.input_ids.numel()
    reliable, reason = fit_reliability(fit_tokens, eng.stack.d_model)
    removed = {b: torch.zeros(L, dtype=torch.float64) for b in BRANCHES}
    affine = {b: torch.zeros(L, dtype=torch.float64) for b in BRANCHES}
    num = {b: torch.zeros(L, L, dtype=torch.float64) for b in BRANCHES}
    den = torch.zeros(L, dtype=torch.float64)
    base_sum = 0.0
    with tqdm(total=eng.num_batches * L, desc="branches", disable=not progress, leave=False) as bar:
        for base in eng.baselines():
            base_sum += base.nll.double().sum().item()
            deltas = [base.hs[l + 1] - base.hs[l] for l in range(L)]
            for l in range(L):
                den[l] += deltas[l].float().norm(dim=-1).double().sum()
            for s in range(L):
                for b in BRANCHES:
                    def record(position, x, y, b=b, s=s, deltas=deltas):
                        if position > s:
                            num[b][s, position] += ((y - x) - deltas[position]).float().norm(dim=-1).double().sum()

                    h_last = eng.resume(base, s, base.hs[s], plan={s: Drop(b)}, on_output=record)
                    removed[b][s] += eng.token_nll(h_last, base.ids).double().sum()

                    def replace(module, args, kwargs, out, fn=maps[b][s]):
                        return _replace_first(out, fn(_input(args, kwargs)))

                    module = sublayer(eng, s, b)
                    h_last = eng.resume(base, s, base.hs[s], plan={
                        s: lambda h, s=s, module=module, replace=replace, base=base: _run_with_hook(
                            eng, base, s, h, module, replace)})
                    affine[b][s] += eng.token_nll(h_last, base.ids).double().sum()
                bar.update()
    # Over data-parallel ranks (no-ops in one process).
    removed, affine, num = ({b: eng.all_sum(v[b]) for b in BRANCHES} for v in (removed, affine, num))
    den, base_sum = eng.all_sum(den), eng.all_sum(torch.tensor(base_sum, dtype=torch.float64)).item()
    tokens = eng.input_ids.shape[0] * (eng.input_ids.shape[1] - 1)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    causal = {}
    for b in BRANCHES:
        ratio = torch.where(den > 0, num[b] / den.clamp_min(1e-300), torch.where(num[b] > 0, torch.inf, 0.0))
        causal[b] = torch.where(upper, ratio, torch.nan)
    means = {b: [causal[b][s, s + 1:].mean().item() if s < L - 1 else float("nan") for s in range(L)]
             for b in BRANCHES}
    return BranchEffects(
        attn_removed=(removed["attn"] / base_sum).tolist(), ffn_removed=(removed["ffn"] / base_sum).tolist(),
        attn_affine=(affine["attn"] / base_sum).tolist(), ffn_affine=(affine["ffn"] / base_sum).tolist(),
        attn_causal=causal["attn"].tolist(), ffn_causal=causal["ffn"].tolist(), attn_causal_mean=means["attn"],
        ffn_causal_mean=means["ffn"], baseline_loss=base_sum / tokens, tokens=tokens, fit_tokens=fit_tokens,
        reliable=reliable, reason=reason)
