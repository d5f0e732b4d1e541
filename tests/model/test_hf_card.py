"""An exported folder stops generating at eos, has a sane model_max_length, a model card; exports and checkpoints
honour the umask."""

from __future__ import annotations

import json
import os
import stat

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from depthlab.model.hf import export_hf
from depthlab.train.trainer import train
from tests.conftest import tiny_config


def test_export_carries_special_tokens_context_and_card(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny_config(tiny_dataset, "--trainer.max_steps=2"), run)
        (run / "analysis").mkdir()
        (run / "analysis" / "results.json").write_text(json.dumps({"summary": {"n_layers": 2, "effective_depth": 1}}))
        out = export_hf(run, tmp_path / "hf")
    finally:
        os.umask(old)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    eos = tokenizer.eos_token_id
    assert eos is not None and model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    assert model.config.bos_token_id is not None and tokenizer.model_max_length == 32
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "depthlab" in front["tags"]
    assert str(run) in card and "effective_depth" in card and "## Training config" in card
    assert f"`{tiny_dataset}`" in card and '"depthlab"' in card  # data and provenance versions
    for path in [*out.iterdir(), *run.rglob("*.safetensors")]:  # 0644 under umask 022, not 0600
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
