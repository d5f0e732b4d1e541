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


def test_permutation_pairs_option_takes_a_list_of_pairs():
    from depthlab.analysis.suite import resolve_options

    for pairs in ([[0, 1], [2, 3]], [(0, 1)], "all", "adjacent"):  # the CLI's JSON lists, Python tuples, the names
        assert resolve_options({"permutation": {"pairs": pairs}})["permutation"]["pairs"] == pairs
    for bad in ("some", [[0]], [[1, 1]], [], 5, [[0, "1"]], [[True, 2]]):
        with pytest.raises(AnalysisError, match=r"^option permutation\.pairs: pairs must be 'all', 'adjacent' or"):
            resolve_options({"permutation": {"pairs": bad}})
    got = analyze(build("llama"), torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0)),
                  ["permutation"], options={"permutation": {"pairs": [[2, 0], [1, 2]]}})["permutation"]
    assert got.pairs == [[0, 2], [1, 2]] and len(got.scores) == 2
    with pytest.raises(AnalysisError, match=r"invalid block pair \(0, 3\) for a model with 3 blocks"):
        analyze(build("llama"), torch.zeros(2, 6, dtype=torch.long), ["permutation"],
                options={"permutation": {"pairs": [[0, 3]]}})
