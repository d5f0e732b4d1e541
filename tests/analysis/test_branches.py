"""Branch-level effects against full forward passes with the sub-layer zeroed or replaced by hand."""

from __future__ import annotations

import math

import pytest
import torch

from depthlab.analysis.branches import branch_effects
from depthlab.analysis.replacement import solve_affine
from depthlab.model.view import ModelView

from .conftest import build, full_loss, hidden_states


def module_of(model, layer: int, branch: str):
    return ModelView(model).sublayer(layer, branch)


def with_hook(model, layer, branch, fn, run):
    """Run run() with the sub-layer's output replaced by fn(its input, its output)."""
    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        first = out[0] if isinstance(out, tuple) else out
        y = fn(x, first)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handle = module_of(model, layer, branch).register_forward_hook(hook, with_kwargs=True)
    try:
        return run()
    finally:
        handle.remove()


def sublayer_io(model, ids, layer, branch):
    store = {}

    def grab(x, y):
        store["x"], store["y"] = x.clone(), y.clone()
        return y

    with torch.no_grad():
        with_hook(model, layer, branch, grab, lambda: model(ids))
    return store["x"], store["y"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2", "mixtral", "depthlab"])
def test_branch_effects_match_hand_zeroed_and_hand_fitted_branches(family, ids):
    model = build(family)
    ids = torch.cat([ids, ids.flip(0), ids.roll(1, 0)], 1)  # 24 tokens a sequence: over-determined fits (d=16)
    got = branch_effects(model, ids, micro_batch_size=3)
    base = full_loss(model, ids)
    hs = hidden_states(model, ids)
    L = len(hs) - 1
    assert got.baseline_loss == pytest.approx(base, rel=1e-5)
    for branch in ("attn", "ffn"):
        for s in range(L):
            zero = lambda x, y: torch.zeros_like(y)
            ratio = with_hook(model, s, branch, zero, lambda: full_loss(model, ids)) / base
            assert getattr(got, f"{branch}_removed")[s] == pytest.approx(ratio, rel=1e-4), (family, branch, s)
            dropped = with_hook(model, s, branch, zero, lambda: hidden_states(model, ids))
            for l in range(s + 1, L):
                new, old = dropped[l + 1] - dropped[l], hs[l + 1] - hs[l]
                ref = ((new - old).norm(dim=-1).sum() / old.norm(dim=-1).sum()).item()
                assert getattr(got, f"{branch}_causal")[s][l] == pytest.approx(ref, rel=1e-3, abs=1e-6)
            assert all(math.isnan(v) for v in getattr(got, f"{branch}_causal")[s][: s + 1])  # NaN at l <= s
            x, y = sublayer_io(model, ids, s, branch)
            xa = torch.cat([x.double().flatten(0, 1), torch.ones(x.shape[0] * x.shape[1], 1, dtype=torch.float64)], 1)
            # normal equations from the captured tensors, solved as usefulness solves them: a LayerNorm'd input has
            # an (fp32-noisy) null direction, where a direct lstsq on the tokens would keep fitting the noise
            fit = solve_affine(xa.T @ xa, xa.T @ y.double().flatten(0, 1))
            ratio = with_hook(model, s, branch, lambda x, y, fit=fit: (x.double() @ fit.weight + fit.bias).to(y.dtype),
                              lambda: full_loss(model, ids)) / base
            assert getattr(got, f"{branch}_affine")[s] == pytest.approx(ratio, rel=1e-4), (family, branch, s)
    assert max(abs(r - 1) for r in got.attn_removed + got.ffn_removed) > 1e-3  # removal changes the loss


def test_affine_columns_fit_on_the_separate_fit_sample(ids):
    """With fit_ids the sub-layer maps come from the fit sample, are evaluated on input_ids, and carry `reliable`."""
    from depthlab.errors import AnalysisError

    model = build("llama")
    generator = torch.Generator().manual_seed(7)  # not the `ids` fixture's seed: disjoint text
    vocab = model.config.vocab_size
    fit = torch.randint(0, vocab, (12, 24), generator=generator)  # 288 tokens ≥ 10·(d+1) = 170 for d=16
    got = branch_effects(model, ids, fit_ids=fit, micro_batch_size=4)
    assert got.fit_tokens == fit.numel() and got.reliable and got.reason is None
    base = full_loss(model, ids)
    x, y = sublayer_io(model, fit, 1, "ffn")
    xa = torch.cat([x.double().flatten(0, 1), torch.ones(x.shape[0] * x.shape[1], 1, dtype=torch.float64)], 1)
    m = solve_affine(xa.T @ xa, xa.T @ y.double().flatten(0, 1))
    ratio = with_hook(model, 1, "ffn", lambda x, y: (x.double() @ m.weight + m.bias).to(y.dtype),
                      lambda: full_loss(model, ids)) / base
    assert got.ffn_affine[1] == pytest.approx(ratio, rel=1e-4)
    in_sample = branch_effects(model, ids[:2, :6], micro_batch_size=4)  # 12 tokens for 17 coefficients
    assert not in_sample.reliable and "fit sample" in in_sample.reason
    with pytest.raises(AnalysisError, match="overlap|share"):
        branch_effects(model, ids, fit_ids=ids)
