"""`depthlab doctor`: the diagnosis agrees with the metrics it summarises, finds an identity block, fits growth laws
correctly, reads the recipe levers from the config, and the CLI prints it / writes JSON / fails in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from depthlab.analysis import usefulness
from depthlab.errors import AnalysisError
from depthlab.tools.doctor import diagnose, growth_fits, recipe_levers

from .conftest import llama

V = 64


def test_growth_fits_recover_the_law_that_generated_the_data():
    exp = growth_fits([3.0 * 1.5**l for l in range(12)])
    assert exp["better"] == "exponential"
    assert exp["exponential"]["rate"] == pytest.approx(math.log(1.5)) and exp["exponential"]["r2_log"] == 1.0
    lin = growth_fits([2.0 + 5.0 * l for l in range(12)])
    assert lin["better"].startswith("linear")
    assert lin["linear"]["slope"] == pytest.approx(5.0) and lin["linear"]["r2_log"] == pytest.approx(1.0)


def test_recipe_levers():
    shape = {"context": 2048, "n_heads": 8, "n_kv_heads": 8, "num_experts": None, "top_k": None}
    levers = {lv["lever"]: lv["status"] for lv in recipe_levers(shape, None)}
    assert levers == {"long context": "absent", "weight decay": "unknown", "GQA": "absent", "MoE": "absent"}
    shape = {"context": 4096, "n_heads": 8, "n_kv_heads": 4, "num_experts": 64, "top_k": 8}
    levers = {lv["lever"]: lv["status"] for lv in recipe_levers(shape, 0.3)}
    assert set(levers.values()) == {"present"}
    assert recipe_levers(shape, 0.0)[1]["status"] == "absent"


def test_diagnosis_matches_the_metrics_and_flags_an_identity_block():
    model = llama(V, layers=4)
    with torch.no_grad():  # block 2 adds nothing to the stream: an exact identity map
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, V, (12, 24), generator=torch.Generator().manual_seed(0))
    diag = diagnose(model, input_ids=ids, tau=0.05)  # cross-fitted: >= 216 fit tokens per map, 10·(d+1) = 170
    full = usefulness(model, ids, tau=0.05)  # the doctor's usefulness, intervals included
    ratios = full.loss_ratios
    assert diag.loss_ratios == pytest.approx(ratios)
    assert diag.undecided_blocks == full.undecided
    assert diag.useful_blocks == [l for l in range(4) if ratios[l] > 1.05]
    assert diag.effective_depth == len(diag.useful_blocks)
    identity = [b for b in diag.near_identity if b["layer"] == 2]
    assert identity and set(identity[0]["reasons"]) == {"cos", "J"}
    assert diag.jacobian_norm[2] == pytest.approx(0.0, abs=1e-9) and diag.angular_distance[2] < 1e-6
    assert diag.sparsity["gqa_group"] == 2 and diag.sparsity["moe"] is None
    assert 0 < diag.sparsity["attention_normalized_entropy"] <= 1
    d = json.loads(json.dumps(diag.to_dict()))
    assert d["effective_depth"] == diag.effective_depth and len(d["out_var"]) == 4
    text = diag.render()
    assert "near-identity blocks (" in text and "2 (cos/J)" in text and "[ absent] MoE" in text


def test_too_few_fit_tokens_are_refused():
    model = llama(V, layers=2)
    ids = torch.randint(0, V, (4, 25), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AnalysisError, match="doctor refuses .* unreliable usefulness .* 75 tokens"):
        diagnose(model, input_ids=ids)
