"""depthlab theory: the simulator against its closed forms, brute-force Jacobians, and the CLI's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from depthlab.errors import ConfigError
from depthlab.theory import simulate
from depthlab.theory.branches import MagnitudeMask, calibrate_beta, softmax_rows
from depthlab.theory.simulate import Settings, _block, _branch, _jacobian, _probes

SMALL = {"layers": 10, "d_model": 32, "seeds": 6, "tokens": 32}


def _within_mc(sim, sem, closed, rel=0.03, k=4.0):
    """|sim − closed| within k standard errors over seeds plus a small relative slack."""
    return np.all(np.abs(sim - closed) <= k * sem + rel * np.abs(closed))


@pytest.mark.parametrize("norm", ["pre", "lns"])
def test_iid_variance_and_jacobian_match_closed_forms(norm):
    run = simulate("iid", densities=[1, 0.5, 0.25], norm=norm, **SMALL).runs[0]
    assert _within_mc(run.var, run.var_sem, run.var_closed)
    # ||J−I||_F uses 1/Var(x_l); Jensen on 1/||x||² adds O(1/d) at d = 32.
    assert _within_mc(run.jac, run.jac_sem, run.jac_closed, rel=0.05)
    assert np.allclose(run.slope, [1, 0.5, 0.25], rtol=0.1)


def test_magnitude_energy_fraction_matches_brute_force_and_simulation():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ranked = z.abs().sort(descending=True).values
    for p in (0.5, 0.125):
        kept = ranked[: int(p * len(z))]
        assert float(MagnitudeMask.energy_fraction(torch.tensor([p]))) == pytest.approx(
            float((kept ** 2).sum() / (z ** 2).sum()), rel=5e-3)
    run = simulate("magnitude", densities=[1, 0.25], **SMALL).runs[0]
    assert _within_mc(run.var, run.var_sem, run.var_closed)
    assert run.slope[1] > 2.5 * 0.25  # a magnitude mask keeps ~0.72 of the growth at p = 0.25, not 0.25


def test_routing_growth_is_k_over_e():
    run = simulate("routing", densities=[1, 0.5, 0.125], experts=8, **SMALL).runs[0]
    assert _within_mc(run.var, run.var_sem, run.var_closed)
    assert np.allclose(run.slope, [1, 0.5, 0.125], rtol=0.15)
    # tokens using different experts cancel in the token-averaged Jacobian; the dense case does not
    ratio = run.jac_mean[:, -1] / run.jac[:, -1]
    p = np.array([1, 0.5, 0.125])
    assert ratio == pytest.approx(np.sqrt(p + (1 - p) / SMALL["tokens"]), rel=0.15)


def test_attention_rows_hit_the_target_support_and_first_block_follows_the_closed_form():
    gen = torch.Generator().manual_seed(1)
    target = torch.tensor([0.5, 0.125, 1 / 32])
    beta = calibrate_beta(target, 64, gen).view(-1, 1, 1)
    rows = softmax_rows(torch.randn(1, 2000, 64, generator=gen), beta)
    assert (rows ** 2).sum(-1).mean(-1) == pytest.approx(target, rel=0.03)
    run = simulate("attention", densities=[1, 0.25, 0.0625], **SMALL).runs[0]
    first = run.var[:, 1] - run.var[:, 0]
    closed = run.var_closed[:, 1] - run.var_closed[:, 0]
    assert first == pytest.approx(closed, rel=0.15)
    assert run.jac[:, 0] == pytest.approx(run.jac_closed[:, 0], rel=0.1)


def test_gqa_sharing_leaves_the_first_increment_unchanged():
    run = simulate("gqa", densities=[1, 0.25], heads=4, support=4, **SMALL).runs[0]
    first = run.var[:, 1] - run.var[:, 0]
    assert first == pytest.approx(run.var_closed[:, 1] - run.var_closed[:, 0], rel=0.15)


@pytest.mark.parametrize("mask", ["iid", "magnitude", "routing"])
def test_final_variance_is_monotone_in_density(mask):
    run = simulate(mask, densities=[1, 0.5, 0.25, 0.125], experts=8, jacobian="estimate", **SMALL).runs[0]
    assert np.all(np.diff(run.var[:, -1]) < 0)  # densities are listed in decreasing order


def test_lns_reduces_growth_and_post_ln_normalises():
    res = simulate("iid", densities=[1, 0.25], norm="all", **SMALL)
    pre, lns, post = (res.run("iid", n) for n in ("pre", "lns", "post"))
    assert np.all(lns.var[:, -1] < 0.5 * pre.var[:, -1])
    assert np.allclose(post.var[:, 1:], 1.0, rtol=1e-5)
    assert post.jac[:, 1:] == pytest.approx(post.jac_closed[:, 1:], rel=0.05)
    assert any("LNS" in line or "lns" in line for line in res.conclusions)


@pytest.mark.parametrize("mask", ["iid", "magnitude", "routing", "attention", "gqa"])
@pytest.mark.parametrize("norm", ["pre", "lns", "post"])
def test_exact_jacobian_equals_autograd_position_summed(mask, norm):
    st = Settings(masks=[mask], norms=[norm], densities=[1.0, 0.5], layers=3, d_model=6, seeds=1, tokens=4,
                  experts=2, heads=2, support=2.0, jacobian="exact")
    gen = torch.Generator().manual_seed(3)
    layer = _branch(st, mask, torch.tensor(st.densities), gen).layer(gen)
    x = torch.randn(1, 2, 4, 6, generator=gen).requires_grad_(True)
    new = _block(norm, layer, x, 2)
    tok = avg = 0
    for probes, weight in _probes(st, gen):
        t, a = _jacobian(x, new, probes, weight)
        tok, avg = tok + t, avg + a
    full = torch.autograd.functional.jacobian(lambda y: _block(norm, layer, y, 2), x.detach())[0, :, :, :, 0]
    eye = torch.eye(6)
    for dens in range(2):
        # M_s = Σ_t ∂x'_t/∂x_s, brute force from the full Jacobian [D, T, d, D, T, d]
        m = torch.stack([full[dens, :, :, dens, s, :].sum(0) for s in range(4)]) - eye
        assert float(tok[0, dens]) == pytest.approx(float((m ** 2).sum((1, 2)).mean()), rel=1e-4)
        assert float(avg[0, dens]) == pytest.approx(float((m.mean(0) ** 2).sum()), rel=1e-4)


def test_deterministic_by_seed():
    a = simulate("routing", densities=[1, 0.5], layers=4, d_model=16, seeds=2, tokens=8, experts=4, seed=5)
    b = simulate("routing", densities=[1, 0.5], layers=4, d_model=16, seeds=2, tokens=8, experts=4, seed=5)
    c = simulate("routing", densities=[1, 0.5], layers=4, d_model=16, seeds=2, tokens=8, experts=4, seed=6)
    da, db, dc = (r.to_dict() for r in (a, b, c))
    for d in (da, db, dc):
        del d["seconds"]
        for run in d["runs"]:
            del run["seconds"], run["cpu_seconds"]
    assert da == db and da != dc


@pytest.mark.parametrize("kwargs, message", [
    ({"densities": [0, 0.5]}, "densities must be in"),
    ({"densities": [1.5]}, "densities must be in"),
    ({"layers": 0}, "layers"),
    ({"d_model": 1}, "d_model"),
    ({"mask": "routing", "densities": [0.3], "experts": 8}, "p·experts"),
    ({"mask": "gqa", "densities": [1 / 3], "heads": 4}, "divide heads"),
    ({"mask": "attention", "densities": [0.01], "tokens": 16}, "1/tokens"),
    ({"mask": "gqa", "heads": 0}, "divisible by heads"),
    ({"mask": "bogus"}, "unknown mask"),
    ({"sigma_w": 0}, "sigma_w"),
])
def test_bad_settings_raise_config_error(kwargs, message):
    base = {"layers": 2, "d_model": 8, "seeds": 1, "tokens": 8}
    with pytest.raises(ConfigError, match=message):
        simulate(**{**base, **kwargs})
