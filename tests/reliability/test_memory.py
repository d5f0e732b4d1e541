"""Memory cap of the analysis engine: cached baselines never exceed `cache_budget_mb`, and a cap that forces
recomputation changes no result (streaming instead of caching is exact)."""

from __future__ import annotations

import torch

from depthlab.analysis.engine import Engine
from depthlab.analysis.suite import METRICS
from depthlab.model.transformer import Transformer
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
