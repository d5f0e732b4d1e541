"""Two data-parallel gloo ranks on CPU give the numbers of one process over all sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from depthlab.analysis.suite import analyze
from depthlab.errors import AnalysisError
from tests.analysis.conftest import V, build
from tests.analysis.test_offload import saved  # noqa: F401 — the saved tiny model fixture

METRICS = ["variance", "causal", "permutation"]
OPTIONS = {"permutation": {"pairs": "all"}}


def sample() -> torch.Tensor:
    return torch.randint(0, V, (5, 8), generator=torch.Generator().manual_seed(7))  # 5 rows: unequal shares


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = analyze(build("llama"), sample(), METRICS, options=OPTIONS, micro_batch_size=2, data_parallel=True)
        Path(f"{out}.{rank}").write_text(json.dumps({k: v.to_dict() for k, v in results.items()}))
        if rank == 0:
            try:
                analyze(build("llama"), sample(), ["lens"], data_parallel=True)
            except AnalysisError as e:
                Path(f"{out}.refused").write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch and transformers: ~1 min on 2 cores
def test_two_gloo_ranks_match_one_process(tmp_path):
    from tests.analysis.test_offload import numbers

    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    ref = numbers(analyze(build("llama"), sample(), METRICS, options=OPTIONS, micro_batch_size=2))
    for rank in (0, 1):
        got = numbers(json.loads(Path(f"{out}.{rank}").read_text()))
        assert got.keys() == ref.keys() and len(ref) > 20
        for key, x in ref.items():
            assert got[key] == pytest.approx(x, rel=1e-9, abs=1e-12, nan_ok=True), (rank, key)
    assert "lens cannot run data-parallel" in Path(f"{out}.refused").read_text()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "depthlab", "analyze", *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


@pytest.mark.slow  # torchrun with two CPU ranks: ~1 min on 2 cores
def test_torchrun_analyze_matches_one_process(saved, tmp_path):  # noqa: F811 — the imported fixture
    from depthlab.cli import main
    from tests.analysis.test_offload import numbers

    common = [str(saved), "--metrics", "causal,permutation", "--num-samples", "3", "--seq-len", "8", "-q",
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
