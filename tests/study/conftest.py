"""Hand-built study folders: the files real runs write, with values chosen so every aggregate is known."""

from __future__ import annotations

import json
import math

import pytest
import yaml

EVIL = '<img src=x onerror="alert(1)">&'


def make_run(study, name, *, label, n_layers, seed, val_ppl, out_var, usefulness=None, causal=None,
             permutation=None, eval_ppl=None, acc=None, state="done"):
    """A run folder with the files a real run writes; `out_var` is the per-layer variance at each logged step."""
    run = study / "runs" / name
    run.mkdir(parents=True)
    config = {"model": {"n_layers": n_layers, "n_heads": 4, "n_kv_heads": 0, "seq_len": 128, "d_model": 64},
              "optimizer": {"weight_decay": 0.1}, "trainer": {"seed": seed}}
    (run / "run.json").write_text(json.dumps({"name": name, "index": len(list((study / "runs").iterdir())),
                                              "label": label, "setting": {"model.n_layers": n_layers},
                                              "seed": seed, "config": config}))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0}, {"step": 20, "val_loss": math.log(val_ppl),
                                                                    "val_ppl": val_ppl}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 2')  # torn line
    stats = [{"step": 10 * (i + 1), "layers": [{"layer": j, "out_var": v} for j, v in enumerate(profile)]}
             for i, profile in enumerate(out_var)]
    (run / "layer_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stats))
    metrics = {}
    if usefulness is not None:
        metrics["usefulness"] = {"score": usefulness}
        metrics["causal"] = {"mean_effect": causal}
        metrics["permutation"] = {"mean_score": permutation}
        metrics["jacobian"] = {"layers": [{"jacobian_norm": 0.1 * (j + 1)} for j in range(n_layers)]}
        (run / "analysis").mkdir()
        (run / "analysis" / "results.json").write_text(json.dumps({"metrics": metrics, "summary": {
            "usefulness_score": usefulness, "causal_mean_effect": causal}}))
    if eval_ppl is not None or acc is not None:
        results = {"results": {}, "groups": {"average": {"acc,none": acc}} if acc is not None else {}}
        if eval_ppl is not None:
            results["perplexity"] = {"perplexity": eval_ppl}
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps(results))
    if state == "done":
        (run / "done.json").write_text("{}")
    elif state == "failed":
        (run / "failed.json").write_text(json.dumps({"error": "TrainingError: non-finite loss <at> step 3"}))
    return run


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    (root / "study.yaml").write_text(yaml.safe_dump({"name": "hand", "reference": "depth", "seeds": [0, 1],
                                                     "knobs": ["model.n_layers"], "base": None}))
    make_run(root, "L12__s0", label="L12", n_layers=12, seed=0, val_ppl=30.0, out_var=[[1.0] * 12, [2.0] * 11 + [8.0]],
             usefulness=0.5, causal=0.30, permutation=0.20, eval_ppl=20.0, acc=0.40)
    make_run(root, "L12__s1", label="L12", n_layers=12, seed=1, val_ppl=32.0, out_var=[[1.0] * 12, [2.0] * 11 + [10.0]],
             usefulness=0.75, causal=0.34, permutation=0.30, eval_ppl=22.0, acc=0.44)
    make_run(root, EVIL, label=EVIL, n_layers=3, seed=0, val_ppl=50.0, out_var=[[1.0, 2.0, 3.0], [1.5, 3.0, 6.0]])
    make_run(root, "L16", label="L16", n_layers=16, seed=0, val_ppl=9.0, out_var=[[1.0] * 16], state="failed")
    return root
