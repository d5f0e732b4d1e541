"""`analyze` is the one metric loop: shared defaults with the CLI, on_result for saving, skip, on_error."""

from __future__ import annotations

import pytest
import torch

from depthlab.analysis import analyze
from depthlab.analysis.defaults import DEFAULT_METRICS
from depthlab.errors import AnalysisError

from .conftest import V, build


def test_defaults_on_result_skip_and_errors():
    model = build("llama")
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    seen = []
    results = analyze(model, ids, on_result=lambda name, r: seen.append(name),
                      options={"usefulness": {"bootstrap": 0}})
    assert seen == list(results) == [m for m in DEFAULT_METRICS if m != "moe"]  # dense: moe dropped
    assert results["permutation"].pairs == [[0, 1], [1, 2]]  # the CLI's adjacent pairs, by default for both
    seen.clear()
    failed = {}
    got = analyze(model, ids, ["variance", "moe", "angular"], skip=("variance",),
                  on_result=lambda name, r: seen.append(name), on_error=lambda name, e: failed.setdefault(name, e))
    assert seen == ["angular"] and list(got) == ["angular"] and isinstance(failed["moe"], AnalysisError)
    with pytest.raises(AnalysisError):
        analyze(model, ids, ["moe"])
