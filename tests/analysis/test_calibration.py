"""Calibration text for `depthlab analyze`: held out from the analysed run's own split, with a disjoint fit sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from depthlab.analysis.runner import run_analysis
from depthlab.data import TokenDataset, calibration_samples, prepare_data, run_heldout
from depthlab.errors import DataError
from depthlab.loading import load_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run_seed1(tiny_dataset, tmp_path_factory):
    """A run trained on the tiny corpus split with seed 1 (not the default seed 0)."""
    from depthlab.train.trainer import train

    root = tmp_path_factory.mktemp("seed1")
    dataset = prepare_data(tiny_dataset.parent / "corpus", root / "data", vocab_size=300, val_fraction=0.2, seed=1)
    train(tiny_config(dataset), root / "run")
    return root / "run", dataset


def test_analysis_text_is_the_analysed_runs_held_out_split(run_seed1, tmp_path):
    run, dataset = run_seed1
    docs = list(TokenDataset(dataset).documents())
    val = [d["name"] for d in docs if d["split"] == "val"]
    train = {d["name"] for d in docs if d["split"] == "train"}
    net, _ = load_model(run)
    assert run_heldout(net) == (dataset, True)
    results = run_analysis(str(run), tmp_path / "out", metrics="variance,usefulness", num_samples=2, seq_len=16,
                           progress=False, log=lambda _: None)
    sample = results["sample"]
    assert sample["documents"] == val and not set(sample["documents"]) & train
    assert sample["disjoint_from_training"] is True and sample["fit"]["disjoint_from_eval"] is True
    u = results["metrics"]["usefulness"]
    assert u["fit_tokens"] == results["settings"]["fit_samples"] * 16 >= 32 * 33 and u["reliable"]
    saved = json.loads((tmp_path / "out" / "metrics" / "usefulness.json").read_text())
    assert saved["fit_tokens"] == u["fit_tokens"] and "reliable" in saved


def test_fit_windows_are_disjoint_from_evaluation_windows(tiny_dataset):
    tok = TokenDataset(tiny_dataset).tokenizer()
    ids, fit, prov = calibration_samples(tok, tiny_dataset, num_samples=6, seq_len=16, fit_samples=20,
                                         fit_seq_len=24, seed=3)
    assert fit.shape == (20, 24) and prov["fit"]["num_samples"] == 20
    eval_runs = {tuple(r) for r in ids.unfold(1, 8, 1).reshape(-1, 8).tolist()}
    fit_runs = {tuple(r) for r in fit.unfold(1, 8, 1).reshape(-1, 8).tolist()}
    assert len(eval_runs & fit_runs) < len(eval_runs) // 4  # only chance 8-gram repeats of the synthetic text
    same, _, _ = calibration_samples(tok, tiny_dataset, num_samples=6, seq_len=16, seed=3)
    assert torch.equal(same, ids)  # adding a fit sample leaves the evaluation sample unchanged
    with pytest.raises(DataError, match="fit windows were requested"):
        calibration_samples(tok, tiny_dataset, num_samples=6, seq_len=16, fit_samples=10**6)
    assert np.isfinite(prov["tokens_available"])


def test_a_run_whose_dataset_is_gone_needs_explicit_text(run_seed1, tmp_path):
    import shutil

    import yaml

    run, _ = run_seed1
    net, _ = load_model(run)
    moved = shutil.copytree(run, tmp_path / "run")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["path"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    net.checkpoint_path = str(moved / "checkpoints" / Path(net.checkpoint_path).name)
    with pytest.raises(DataError, match="held-out split is unknown"):
        run_heldout(net)
