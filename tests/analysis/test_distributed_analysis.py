"""Two data-parallel gloo ranks on CPU (torchrun) give the numbers of one process over all sequences.

One torchrun launch runs this module as a script (`_ranks`): every data-parallel metric on tiny models (`CALLS`),
then `depthlab analyze` with the default metrics. Each test compares one part with the same call in one process.
Shares are whole micro-batches (4 evaluation and 12 fit sequences over 2 ranks, micro-batches of 2), so every
sequence runs in the same batch as in one process: only the order of the fp64 additions differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthlab.analysis.engine import DATA_PARALLEL_METRICS, Engine, check_data_parallel
from depthlab.errors import AnalysisError
from tests.analysis.conftest import V, build
from tests.analysis.test_offload import saved  # noqa: F401 — the saved tiny model fixture
from tests.conftest import one_torch_thread

MICRO_BATCH = 2
CALLS: dict[str, tuple[str, str, dict]] = {
    "angular": ("llama", "angular", {}),
    "usefulness_cross_fitted": ("llama", "usefulness", {"folds": 3, "bootstrap": 200}),  # folds [0, 0, 1, 2]
    "usefulness_fit_sample": ("llama", "usefulness", {"fit": True, "folds": 5, "bootstrap": 200}),
    "jacobian_exact": ("llama", "jacobian", {"mode": "exact"}),
    "jacobian_exact_per_token": ("llama", "jacobian", {"mode": "exact", "kind": "per_token"}),
    "jacobian_estimate": ("llama", "jacobian", {"mode": "estimate", "probes": 4}),
    "jacobian_estimate_per_token": ("llama", "jacobian", {"mode": "estimate", "kind": "per_token", "probes": 4,
                                                          "power_iters": 5}),
    "attention_sparsity": ("llama", "attention_sparsity", {"micro_batch_size": 1}),
    "weight_sparsity": ("llama", "weight_sparsity", {}),
    "lens": ("llama", "lens", {}),
    "branches": ("llama", "branches", {"fit": True}),
    "moe": ("mixtral", "moe", {}),
}
"""Test name → (model family, metric, options); "fit": True passes the separate fit sample."""
CLI = ["--num-samples", "4", "--seq-len", "8", "-q", "--device", "cpu", "--dtype", "fp32", "--micro-batch-size",
       str(MICRO_BATCH), "--option", "permutation.pairs=[[0,2],[1,2]]", "--option", "usefulness.bootstrap=200"]
"""`depthlab analyze` with the default metrics (and --data: random words of the tiny tokenizer, so the fit is well
conditioned); the default fit sample is 68 sequences (34 per rank)."""


def compute(name: str, data_parallel: bool, cache: dict) -> dict:
    """The result of CALLS[name] as a dict, on an engine shared per family (`cache`)."""
    from depthlab.analysis.suite import METRICS

    family, metric, options = CALLS[name]
    options = dict(options)
    if family not in cache:
        ids = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(1))
        model = build(family)
        cache[family] = model, ids, Engine(model, ids, micro_batch_size=MICRO_BATCH, data_parallel=data_parallel)
    model, ids, engine = cache[family]
    if options.pop("fit", False):
        options["fit_ids"] = torch.randint(0, V, (12, 8), generator=torch.Generator().manual_seed(2))
    if metric in ("usefulness", "branches"):
        options["micro_batch_size"] = MICRO_BATCH  # of the fit engine
    return METRICS[metric](model, ids, engine=engine, **options).to_dict()


def _ranks(saved_model: str, data: str, out: Path) -> int:
    """One rank of the torchrun launch: CALLS into out/calls.json (rank 0), then the CLI into out/ddp."""
    from depthlab.cli import main
    from depthlab.train.distributed import Dist

    dist = Dist.from_env()
    cache: dict = {}
    results = {name: compute(name, True, cache) for name in CALLS}
    if dist.is_main:
        (out / "calls.json").write_text(json.dumps(results))
    return main(["analyze", saved_model, *CLI, "--data", data, "--out", str(out / "ddp")])  # ends the process group


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    words = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"t{w}" for w in words))
    return path


@pytest.fixture(scope="module")
def ranks(saved, text, tmp_path_factory):  # noqa: F811 — the imported fixture
    out = tmp_path_factory.mktemp("ranks")
    proc = _torchrun("-m", "tests.analysis.test_distributed_analysis", str(saved), str(text), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The references run single-threaded, as the ranks do, so every matmul splits its work the same way."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_process():
    """CALLS[name] in this process (engines shared per family)."""
    cache: dict = {}
    return lambda name: compute(name, False, cache)


def assert_same(ref, got, path: str = "") -> None:
    """Equal structure; floats to 1e-9 relative (fp64 addition order), everything else exactly."""
    if isinstance(ref, dict):
        assert isinstance(got, dict) and ref.keys() == got.keys(), path
        for k in ref:
            assert_same(ref[k], got[k], f"{path}.{k}")
    elif isinstance(ref, list | tuple):
        assert isinstance(got, list | tuple) and len(ref) == len(got), path
        for i, (a, b) in enumerate(zip(ref, got)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) or isinstance(got, float):
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert got == ref, path


def test_data_parallel_refusals():
    check_data_parallel(DATA_PARALLEL_METRICS, 2, 2)  # allowed
    with pytest.raises(AnalysisError, match="^tuned_lens cannot run data-parallel"):
        check_data_parallel(["variance", "tuned_lens"], 4, 2)
    with pytest.raises(AnalysisError, match="3 data-parallel ranks need at least 3 sequences, got 2"):
        check_data_parallel(["variance"], 2, 3)
    with pytest.raises(AnalysisError, match="2 data-parallel ranks need at least 2 fit sequences, got 1: .*--fit-samples"):
        check_data_parallel(["usefulness"], 4, 2, 1)


@pytest.mark.slow  # one torchrun launch of two CPU ranks (shared by every test here): ~1 min on 2 cores
@pytest.mark.parametrize("name", list(CALLS))
def test_metric_matches_one_process(ranks, one_process, name):
    got = json.loads((ranks / "calls.json").read_text())[name]
    ref = one_process(name)
    assert_same(ref, got, name)
    if name.startswith("usefulness"):  # the fields that are not sums: fit size, reliability, intervals
        assert got["fit_tokens"] == ref["fit_tokens"] > 0 and got["reliable"] is ref["reliable"]
        assert got["score_interval"] == pytest.approx(ref["score_interval"], rel=1e-9)
        assert max(got["fit_std"]) > 0  # the jackknife refits ran (spread over both ranks)
    if name.startswith("jacobian_estimate"):
        assert got["layers"][0]["jacobian_norm_se"] > 0


@pytest.mark.slow
def test_torchrun_analyze_default_metrics_match_one_process(saved, text, ranks, tmp_path):  # noqa: F811
    from depthlab.analysis.defaults import DEFAULT_METRICS
    from depthlab.cli import main

    assert main(["analyze", str(saved), *CLI, "--data", str(text), "--out", str(tmp_path / "one")]) == 0
    a, b = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "one", ranks / "ddp"))
    assert b["provenance"]["data_parallel_ranks"] == 2
    assert list(b["metrics"]) == [m for m in DEFAULT_METRICS if m != "moe"]  # dense: moe dropped
    assert b["metrics"]["permutation"]["pairs"] == [[0, 2], [1, 2]]  # an explicit pair list through --option
    for metric in a["metrics"].values():
        metric.pop("seconds")
    for metric in b["metrics"].values():
        metric.pop("seconds")
    assert_same(a["metrics"], b["metrics"], "metrics")
    bad = _torchrun("-m", "depthlab", "analyze", str(saved), *CLI[:1], "1", *CLI[2:],
                    "--out", str(tmp_path / "bad"))  # 2 ranks, 1 sequence
    assert bad.returncode != 0 and "2 data-parallel ranks need at least 2 sequences" in bad.stderr
    assert not (tmp_path / "bad").exists()


if __name__ == "__main__":  # a rank of the `ranks` fixture's torchrun launch
    torch.set_num_threads(1)
    sys.exit(_ranks(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
