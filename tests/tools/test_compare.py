"""`depthlab compare` of any models: shared sample, per-layer table and plots, linear CKA against its formula."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from depthlab.analysis.cka import linear_cka
from depthlab.analysis.engine import Engine
from depthlab.cli import main
from depthlab.errors import StudyError
from depthlab.study.compare import compare_models

from .conftest import llama


def direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X̃ᵀỸ||²_F / (||X̃ᵀX̃||_F ||ỸᵀỸ||_F) on the full token matrices, fp64."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return ((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def test_linear_cka_matches_the_direct_formula():
    a, b = llama(50, layers=3, seed=0), llama(50, layers=2, seed=1)
    ids = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(0))
    ea, eb = Engine(a, ids, micro_batch_size=2), Engine(b, ids, micro_batch_size=2)
    got = linear_cka(ea, eb)
    ha = [torch.cat(h) for h in zip(*(base.hs for base in ea.baselines()))]
    hb = [torch.cat(h) for h in zip(*(base.hs for base in eb.baselines()))]
    assert len(got) == 4 and len(got[0]) == 3
    for i in range(4):
        for j in range(3):
            assert got[i][j] == pytest.approx(direct_cka(ha[i], hb[j]), rel=1e-6)
    self_cka = linear_cka(ea, Engine(a, ids, micro_batch_size=2))
    assert [self_cka[i][i] for i in range(4)] == pytest.approx([1.0] * 4)
    with pytest.raises(Exception, match="same token ids"):
        linear_cka(ea, Engine(b, ids.flip(0), micro_batch_size=2))


@pytest.fixture(scope="module")
def shallow_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama-2")
    llama(len(tokenizer), layers=2, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compare_models_of_different_depths_and_tokenizers(hf_folder, shallow_folder, depthlab_run, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(hf_folder), str(shallow_folder), str(depthlab_run), "--num-samples", "3",
                 "--seq-len", "16", "--out", str(out), "--device", "cpu", "--dtype", "fp32", "-q"]) == 0
    c = json.loads((out / "compare.json").read_text())
    assert [m["tokenization"] for m in c["models"]] == ["shared", "shared", "retokenised"]
    assert [m["n_layers"] for m in c["models"]] == [4, 2, 4]
    assert len(c["cka"]) == 1 and (c["cka"][0]["a"], c["cka"][0]["b"]) == (0, 1)  # C's tokens do not align
    matrix = c["cka"][0]["matrix"]
    assert len(matrix) == 5 and len(matrix[0]) == 3 and all(0 <= v <= 1 + 1e-9 for row in matrix for v in row)
    rows = list(csv.DictReader((out / "compare_layers.csv").open()))
    assert len(rows) == 4 + 2 + 4
    assert [float(r["relative_depth"]) for r in rows[4:6]] == [0.5, 1.0]
    assert float(rows[3]["lens.kl"]) == 0.0 and float(rows[0]["lens.kl"]) > 0
    for name in ("compare_angular.png", "compare_lens.png", "cka_A_B.png"):
        assert (out / name).stat().st_size > 0


def test_compare_bad_input_writes_nothing(hf_folder, depthlab_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(hf_folder), str(tmp_path / "missing"), "--out", str(out), "-q"]) == 2
    assert main(["compare", str(hf_folder), str(hf_folder), "--metrics", "nope", "--out", str(out), "-q"]) == 2
    assert main(["compare", str(hf_folder), "--out", str(out), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 3 and all(line.startswith("depthlab compare: error:") for line in err), err
    assert not out.exists()
    with pytest.raises(StudyError, match="given as token ids"):
        compare_models([str(hf_folder), str(depthlab_run)], out, input_ids=torch.zeros(2, 8, dtype=torch.long))
    assert not out.exists()
