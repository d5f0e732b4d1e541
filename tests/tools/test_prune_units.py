"""`prune --unit attn|mlp`: zeroed sub-layers, saved as standard models that plain transformers reproduces."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from depthlab.analysis.engine import Drop, Engine
from depthlab.cli import main
from depthlab.tools.prune import PruneError, prune, save_pruned
from tests.analysis.conftest import build

IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))


def depthlab_logits(model, ids, unit: str, layers: list[int]) -> torch.Tensor:
    """The engine's logits with those blocks' branch dropped (the analysis definition of 'removed')."""
    eng = Engine(model, ids)
    base = next(eng.baselines())
    plan = {l: Drop("attn" if unit == "attn" else "ffn") for l in layers}
    with torch.no_grad():
        return eng.stack.final(eng.resume(base, 0, base.hs[0], plan=plan))


@pytest.mark.parametrize(("family", "unit"), [("llama", "attn"), ("gpt2", "attn"), ("olmo2", "attn"),
                                              ("qwen2", "mlp"), ("mixtral", "mlp")])
def test_pruned_sublayers_load_with_plain_transformers(family, unit, tmp_path):
    model = build(family)
    pruned, selection = prune(model, "0,2", unit=unit)
    assert selection.dropped == [0, 2]
    save_pruned(pruned, None, tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.depthlab_zeroed == {unit: [0, 2]}
    with torch.no_grad():
        theirs = loaded(IDS).logits
    ours = depthlab_logits(model, IDS, unit, [0, 2])
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, theirs, atol=1e-3)  # something was removed
    assert any(p.abs().sum() > 0 for p in model.parameters())  # the original is untouched


def test_depthlab_model_attention_removed():
    model = build("depthlab")
    pruned, _ = prune(model, "1", unit="attn")
    with torch.no_grad():
        assert torch.allclose(pruned(IDS).logits, depthlab_logits(model, IDS, "attn", [1]), atol=1e-5)


def test_prune_units_cli_and_bad_input(hf_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["--num-samples", "3", "--eval-samples", "2", "--seq-len", "16", "--device", "cpu", "--dtype", "fp32",
            "-q"]
    assert main(["prune", str(hf_folder), "--unit", "attn", "--drop", "auto", "--n", "2", "--out", str(out),
                 *args]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["unit"] == "attn" and report["method"] == "removal" and len(report["dropped"]) == 2
    assert report["n_layers_after"] == report["n_layers_before"] == 4
    ratios = report["selection_scores"]
    assert sorted(report["dropped"]) == sorted(sorted(range(4), key=ratios.__getitem__)[:2])
    loaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.depthlab_zeroed == {"attn": report["dropped"]}
    bad = tmp_path / "never"
    for case in (["--unit", "attn", "--drop", "7"], ["--unit", "mlp", "--drop", "auto", "--method", "angular"],
                 ["--unit", "attn", "--drop", "0-3"]):
        assert main(["prune", str(hf_folder), *case, "--out", str(bad), *args]) == 2, case
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 3 and all(line.startswith("depthlab prune: error:") for line in err), err
    with pytest.raises(SystemExit) as e:
        main(["prune", str(hf_folder), "--unit", "heads", "--drop", "1", "--out", str(bad)])
    assert e.value.code == 2
    assert not bad.exists()
    with pytest.raises(PruneError, match="unknown unit"):
        prune(build("llama"), "1", unit="heads")
