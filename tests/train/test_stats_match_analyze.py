"""A training run's logged statistics equal `depthlab.analysis.analyze` on the same weights and the same tokens.

Both sides call `depthlab.measures`; this pins that they also measure the same tensors (block outputs, branch outputs
as added to the stream, the final norm, the routers' actual top-k) under the same names.
"""

from __future__ import annotations

import json

import pytest

import depthlab
from depthlab.analysis import analyze
from depthlab.data import TokenDataset, eval_batches, sample_batch
from depthlab.train import sparsity
from depthlab.train.trainer import train
from tests.conftest import tiny_config


def close(a, b, rel=1e-5):
    return a == pytest.approx(b, rel=rel, abs=1e-9)


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_logged_statistics_equal_analyze_on_the_same_tokens(tiny_dataset, tmp_path, norm):
    # Three steps; the stats line of step 3 is measured on the weights after two updates = checkpoint 2.
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=3", "--trainer.save_interval=2", "--trainer.eval_interval=0",
                      "--trainer.stats_interval=3", "--trainer.micro_batch_size=4", "--trainer.stats_weight_sparsity=true",
                      "--trainer.stats_attention=true", f"--model.norm={norm}", "--model.moe.num_experts=4",
                      "--model.moe.top_k=2", "--model.moe.expert_hidden=16")
    run = tmp_path / "run"
    train(cfg, run)
    logged = [json.loads(line) for line in (run / "layer_stats.jsonl").read_text().splitlines()][-1]
    assert logged["step"] == 3
    model, _ = depthlab.load_model(min((run / "checkpoints").glob("step_*")))
    dataset = TokenDataset(tiny_dataset)
    x, _ = sample_batch(dataset.split("train"), 8, 32, seed=cfg.trainer.seed, step=2)  # the batch of step 3
    probe, _ = next(eval_batches(dataset.split("val"), sparsity.ATTENTION_PROBE_SEQUENCES, 32, 1))
    res = {k: v.to_dict() for k, v in analyze(model, x, ["variance", "weight_sparsity", "moe"]).items()}
    att = analyze(model, probe, ["attention_sparsity"])["attention_sparsity"].to_dict()

    var, moe = res["variance"], res["moe"]
    assert close(logged["final_norm_var"], var["final_norm_var"]) and logged["sample_tokens"] == var["tokens"]
    assert close(logged["moe_diversity"], moe["diversity"])
    for l, layer in enumerate(logged["layers"]):
        for key in ("out_var", "attn_var", "ffn_var", "attn_norm", "ffn_norm"):
            assert close(layer[key], var[key][l]), (l, key)
        assert close(layer["out_norm"], var["stream_norm"][l])
        assert layer["moe_load"] == pytest.approx(moe["load"][l], abs=1e-12)
        for key in ("imbalance", "balance", "router_entropy"):
            assert close(layer[f"moe_{key}"], moe[key][l]), (l, key)
        rows = {r["matrix"]: r for r in res["weight_sparsity"]["matrices"] if r["layer"] == l}
        assert rows.keys() == layer["weight_sparsity"].keys()
        for matrix, stats in layer["weight_sparsity"].items():
            assert stats == pytest.approx({k: rows[matrix][k] for k in stats}, rel=1e-12), matrix
        assert close(layer["attn_entropy"], att["layer_entropy"][l])
        assert close(layer["attn_normalized_entropy"], att["layer_normalized_entropy"][l])
        assert close(layer["attn_effective_support"], att["layer_effective_support"][l])
        assert layer["attn_entropy_heads"] == pytest.approx(att["entropy"][l], rel=1e-5)
        for key in ("top1_mass", "top8_mass"):
            assert close(layer[f"attn_{key}"], sum(att[key][l]) / len(att[key][l])), key
