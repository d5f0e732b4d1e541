"""Tracking over training: keep_every keeps checkpoints, `analyze --checkpoints` measures each on one sample."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from depthlab import checkpoint as ckpt
from depthlab.analysis.lens import logit_lens
from depthlab.cli import main
from depthlab.data import calibration_sample
from depthlab.loading import load_model
from tests.conftest import tiny_config

ARGS = ["--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--dtype", "fp32", "-q"]


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tiny_dataset):
    """12 steps saved every 4 with keep_last=1 and keep_every=4: steps 4, 8 and 12 survive."""
    from depthlab.train.trainer import train

    out = tmp_path_factory.mktemp("track") / "run"
    train(tiny_config(tiny_dataset, "--trainer.keep_last=1", "--trainer.keep_every=4"), out)
    return out


def test_keep_every_keeps_multiples_beyond_keep_last(run3, tmp_path):
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run3 / "checkpoints")] == [4, 8, 12]
    import torch

    weights = {"w": torch.zeros(1)}
    for step in range(1, 7):
        ckpt.save_checkpoint(tmp_path, step, weights, {}, keep_last=2, keep_every=3)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [3, 5, 6]


def test_analyze_checkpoints_tracks_every_step_on_one_sample(run3, tmp_path, capsys):
    out = tmp_path / "track"
    assert main(["analyze", str(run3), "--checkpoints", "all", "--metrics", "lens,angular", "--out", str(out),
                 *ARGS]) == 0
    rows = list(csv.DictReader((out / "tracking.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert len({r["lens.kl.mean"] for r in rows}) == 3  # the model changes between checkpoints
    tracking = json.loads((out / "tracking.json").read_text())
    assert len({r["key"]["token_sha256"] for r in tracking["checkpoints"]}) == 1  # one fixed sample
    # step 8's lens equals a direct logit lens of that checkpoint on the recorded sample
    kl = tracking["checkpoints"][1]["metrics"]["lens"]["kl"]
    direct = _direct_lens(run3, tracking)
    assert kl == pytest.approx(direct, rel=1e-5)
    for name in ("tracking.png", "tracking_lens.png", "tracking_angular.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()
    assert main(["analyze", str(run3), "--checkpoints", "4,12", "--metrics", "lens,angular", "--out", str(out),
                 *ARGS[:-1]]) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert [int(r["step"]) for r in csv.DictReader((out / "tracking.csv").open())] == [4, 12]


def _direct_lens(run, tracking) -> list[float]:
    """The logit lens of step 8 on the sample tracking recorded (same token hash)."""
    from depthlab.data import run_heldout

    model, tok = load_model(run / "checkpoints" / "step_000008")
    ids, sample = calibration_sample(tok, text=run_heldout(model)[0], num_samples=4, seq_len=32, seed=0)
    assert sample["token_sha256"] == tracking["sample"]["token_sha256"]
    return logit_lens(model, ids).kl


def test_checkpoints_of_a_folder_of_model_folders(hf_folder, tmp_path):
    series = tmp_path / "series"
    for step in (1000, 500):
        shutil.copytree(hf_folder, series / f"checkpoint-{step}")
    out = tmp_path / "track"
    assert main(["analyze", str(series), "--checkpoints", "all", "--metrics", "angular", "--out", str(out),
                 *ARGS]) == 0
    assert [int(r["step"]) for r in csv.DictReader((out / "tracking.csv").open())] == [500, 1000]
    assert main(["analyze", str(series), "--checkpoints", "checkpoint-1000", "--metrics", "angular", "--out",
                 str(tmp_path / "one"), *ARGS]) == 0


def test_bad_checkpoints_are_one_line_errors_and_write_nothing(run3, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "never"
    cases = [[str(tmp_path / "empty"), "--checkpoints", "all"], [str(run3), "--checkpoints", "5"],
             [str(run3), "--checkpoints", ","], [str(run3), "--checkpoints", "all", "--metrics", "nope"],
             [str(run3), "--checkpoints", "all", "--option", "lens.nope=1"]]
    for case in cases:
        assert main(["analyze", *case, "--out", str(out), *ARGS]) == 2, case
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == len(cases) and all(line.startswith("depthlab analyze: error:") for line in err), err
    assert "available: 4, 8, 12" in err[1]
    assert not out.exists()
