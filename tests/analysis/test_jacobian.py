"""Jacobian summaries against torch.autograd.functional.jacobian of the isolated block."""

from __future__ import annotations

import math

import pytest
import torch

from depthlab.analysis import jacobian
from depthlab.analysis.engine import Engine
from depthlab.analysis.jacobians import PROBED

from .conftest import build


def reference_matrices(model, ids, layer):
    """(M_position_summed, M_per_token) from the full autograd Jacobian of block `layer` on the whole sample."""
    engine = Engine(model, ids, micro_batch_size=len(ids))
    base = next(engine.baselines())
    args, kwargs = base.calls[layer]
    block = engine.stack.blocks[layer]
    x = base.hs[layer].float()

    def f(inp):
        out = block(inp, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    J = torch.autograd.functional.jacobian(f, x).double()  # [B,T,d, B,T,d]
    B, T = x.shape[:2]
    summed = sum(J[b, :, :, b].sum(0) for b in range(B)).sum(1) / (B * T)  # Σ_t over outputs, Σ_s over inputs
    per_token = sum(J[b, t, :, b, t] for b in range(B) for t in range(T)) / (B * T)
    return summed, per_token


def summaries(M):
    d = M.shape[0]
    diag = M.diagonal()
    return {"jacobian_norm": (M - torch.eye(d, dtype=M.dtype)).norm().item() / d,
            "off_diagonal_norm": (M - torch.diag(diag)).norm().item() / math.sqrt(d * d - d),
            "diagonal_mean": diag.mean().item(), "diagonal_std": diag.std(unbiased=False).item(),
            "frobenius_norm": M.norm().item(), "spectral_norm": torch.linalg.matrix_norm(M, 2).item()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_matches_autograd_jacobian(family, ids):
    model = build(family)
    ids = ids[:2, :6]
    exact = jacobian(model, ids, mode="exact", kind="position_summed", layers=[1], micro_batch_size=1)
    tok = jacobian(model, ids, mode="exact", kind="per_token", layers=[1])
    summed_ref, tok_ref = reference_matrices(model, ids, 1)
    for key, value in summaries(summed_ref).items():
        assert exact.layers[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for key, value in summaries(tok_ref).items():
        assert tok.layers[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert exact.identity_fraction == float(exact.layers[0]["diagonal_mean"] > 0.5)


def test_estimate_within_reported_error_of_exact(ids):
    model = build("llama")
    exact = jacobian(model, ids, mode="exact", layers=[0, 2])
    est = jacobian(model, ids, mode="estimate", probes=64, power_iters=30, layers=[0, 2], seed=3)
    for e, x in zip(est.layers, exact.layers):
        for key in ("jacobian_norm", "diagonal_mean"):
            assert abs(e[key] - x[key]) <= 4 * e[f"{key}_se"] + 1e-9, (key, e[key], x[key], e[f"{key}_se"])
        assert e["spectral_norm"] == pytest.approx(x["spectral_norm"], rel=0.02)


def test_bf16_model_jacobian_is_computed_in_fp32(ids):
    model = build("llama")
    fp32 = jacobian(model, ids[:2], mode="exact", layers=[1])
    bf16 = jacobian(model.to(torch.bfloat16), ids[:2], mode="exact", layers=[1])
    # the bf16 model's stream is rounded, but the Jacobian itself is taken in fp32 on an fp32 copy of the block
    assert bf16.layers[0]["diagonal_mean"] == pytest.approx(fp32.layers[0]["diagonal_mean"], rel=0.05)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("family, kind", [("llama", "position_summed"), ("depthlab", "per_token")])
def test_estimates_are_unbiased_over_probe_seeds(family, kind, ids):
    """Over many probe seeds the mean estimate lies within 2 standard errors (of that mean) of the exact value, and
    the reported per-estimate standard error matches the spread across seeds."""
    model = build(family)
    engine = Engine(model, ids)
    exact = jacobian(model, ids, mode="exact", kind=kind, layers=[1], engine=engine).layers[0]
    seeds = 40
    rows = [jacobian(model, ids, mode="estimate", kind=kind, probes=16, power_iters=0, layers=[1], seed=100 + s,
                     engine=engine).layers[0] for s in range(seeds)]
    for key in PROBED:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        se = torch.tensor([r[f"{key}_se"] for r in rows], dtype=torch.float64)
        spread = values.std()
        assert abs(values.mean().item() - exact[key]) <= 2 * spread.item() / math.sqrt(seeds), key
        assert 0.6 < (se.mean() / spread).item() < 1.6, key
    assert all(math.isnan(r["diagonal_std"]) for r in rows)  # no unbiased estimator: not reported
    assert exact["diagonal_var"] == pytest.approx(exact["diagonal_std"] ** 2)


@pytest.mark.parametrize("kind", ["position_summed", "per_token"])
def test_spectral_norm_by_lanczos_for_both_kinds(kind, ids):
    model = build("gpt2")
    engine = Engine(model, ids)
    exact = jacobian(model, ids, mode="exact", kind=kind, layers=[0, 2], engine=engine)
    est = jacobian(model, ids, mode="estimate", kind=kind, probes=4, power_iters=40, layers=[0, 2], engine=engine)
    for e, x in zip(est.layers, exact.layers):
        assert e["spectral_norm"] == pytest.approx(x["spectral_norm"], rel=1e-4)
        assert 1 <= e["spectral_iters"] < 40
    short = jacobian(model, ids, mode="estimate", kind=kind, probes=4, power_iters=1, layers=[0], engine=engine)
    assert math.isnan(short.layers[0]["spectral_norm"])  # not converged in one iteration: not reported
