"""Memory cap of the analysis engine: cached baselines never exceed `cache_budget_mb`, and a cap that forces
recomputation changes no result (streaming instead of caching is exact). The up-front plan (`plan_memory`): its
cache estimate is exactly what the engine caches, a working set beyond the available memory is refused in one line
before anything is written, and a cache beyond the budget is said once."""

from __future__ import annotations

import pytest
import torch

import depthlab.analysis.runner
from depthlab.analysis.engine import Engine
from depthlab.analysis.runner import plan_memory
from depthlab.analysis.suite import METRICS
from depthlab.cli import main
from depthlab.model.transformer import Transformer
from depthlab.model.view import ModelView
from tests.conftest import tiny_config


def test_cache_budget_bounds_memory_without_changing_results(tiny_dataset):
    cfg = tiny_config(tiny_dataset, "--model.vocab_size=300", "--model.n_layers=4").model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 300, (16, 32))
    unbounded = Engine(model, ids, micro_batch_size=2)
    reference = METRICS["variance"](model, ids, engine=unbounded).to_dict()
    per_batch = max(b.nbytes() for b in unbounded._cache.values())
    assert len(unbounded._cache) == unbounded.num_batches  # everything fits the default 2 GiB

    budget_mb = 2.5 * per_batch / 2**20  # room for two of the eight micro-batches
    capped = Engine(model, ids, micro_batch_size=2, cache_budget_mb=budget_mb)
    result = METRICS["variance"](model, ids, engine=capped).to_dict()
    assert len(capped._cache) == 2 and sum(b.nbytes() for b in capped._cache.values()) <= budget_mb * 2**20
    result.pop("seconds", None), reference.pop("seconds", None)
    assert result == reference


def test_cache_estimate_is_what_the_engine_caches(tiny_dataset, monkeypatch):
    cfg = tiny_config(tiny_dataset, "--model.vocab_size=300", "--model.n_layers=3").model
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 300, (6, 24))
    engine = Engine(model, ids, micro_batch_size=2)
    METRICS["variance"](model, ids, engine=engine)  # caches every baseline with its branch outputs
    for base in engine._cache.values():
        assert base.nll is not None  # computed on first use; the plan counts it (loss-scoring metrics cache it)
    cached = sum(b.nbytes() for b in engine._cache.values())
    monkeypatch.setattr(depthlab.analysis.runner, "device_memory", lambda device: (None, 2**50))
    lines = []
    for budget in (cached, cached - 1):
        assert plan_memory(model, ModelView(model), 6, 24, 2, budget, branches=True, log=lines.append) == budget
    assert len(lines) == 1 and "--cache-budget" in lines[0], lines  # only the budget one byte short is reported


@pytest.fixture
def available(monkeypatch):
    """Set the memory the machine reports as available (bytes)."""
    def set_available(n: int):
        monkeypatch.setattr(depthlab.analysis.runner, "device_memory", lambda device: (2**40, n))
    return set_available


def test_working_set_beyond_memory_is_refused_before_anything_is_written(workspace, tmp_path, available, capsys):
    available(0)  # only the weights, already loaded, fit
    out = tmp_path / "a"
    assert main(["analyze", str(workspace / "run"), "--seq-len", "16", "--num-samples", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "one micro-batch of 2x16 tokens" in err and "--micro-batch-size" in err and "--device-map" in err, err
    assert not out.exists()


def test_cache_beyond_the_budget_is_said_once(workspace, tmp_path, available, capsys):
    available(2**40)
    argv = ["analyze", str(workspace / "run"), "--metrics", "variance,angular", "--seq-len", "16", "--num-samples",
            "4", "--micro-batch-size", "1", "--cache-budget", "1KiB", "--quiet", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache:")]
    assert len(said) == 1 and "--cache-budget allows 1.0 KiB" in said[0] and "recomputed" in said[0], said
