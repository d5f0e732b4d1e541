"""Two data-parallel gloo ranks on CPU give the numbers of one process over all sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from depthlab.analysis.suite import analyze
from depthlab.errors import AnalysisError
from tests.analysis.conftest import V, build

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
