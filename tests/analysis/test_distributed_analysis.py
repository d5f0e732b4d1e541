"""Two data-parallel gloo ranks on CPU (torchrun) give the numbers of one process over all sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from depthlab.analysis.engine import check_data_parallel
from depthlab.errors import AnalysisError
from tests.analysis.test_offload import saved  # noqa: F401 — the saved tiny model fixture


def test_data_parallel_refusals():
    check_data_parallel(["variance", "causal", "permutation"], 2, 2)  # allowed
    with pytest.raises(AnalysisError, match="lens, usefulness cannot run data-parallel"):
        check_data_parallel(["variance", "lens", "usefulness"], 4, 2)
    with pytest.raises(AnalysisError, match="3 data-parallel ranks need at least 3 sequences, got 2"):
        check_data_parallel(["variance"], 2, 3)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "depthlab", "analyze", *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


@pytest.mark.slow  # torchrun with two CPU ranks: ~1 min on 2 cores
def test_torchrun_analyze_matches_one_process(saved, tmp_path):  # noqa: F811 — the imported fixture
    from depthlab.cli import main
    from tests.analysis.test_offload import numbers

    common = [str(saved), "--metrics", "variance,causal,permutation", "--num-samples", "3", "--seq-len", "8", "-q",
              "--device", "cpu", "--dtype", "fp32", "--micro-batch-size", "1"]
    proc = _torchrun(*common, "--out", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["analyze", *common, "--out", str(tmp_path / "one")]) == 0
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "ddp"))
    assert b["provenance"]["data_parallel_ranks"] == 2
    ref, got = numbers(a["metrics"]), numbers(b["metrics"])
    for key, x in ref.items():
        if not key.endswith("seconds"):
            assert got[key] == pytest.approx(x, rel=1e-9, abs=1e-12, nan_ok=True), key
    bad = _torchrun(*common[:4], "1", *common[5:], "--out", str(tmp_path / "bad"))  # 2 ranks, 1 sequence
    assert bad.returncode != 0 and "2 data-parallel ranks need at least 2 sequences" in bad.stderr
    assert not (tmp_path / "bad").exists()
