"""`depthlab.load_model`: the kinds of path it opens and its one-line errors; the smollm2 alias."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from depthlab.errors import ModelLoadError
from depthlab.loading import load_model


def test_load_model_paths_and_errors(hf_folder, tmp_path):
    model, tokenizer = load_model(hf_folder, dtype="bf16")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.eos_token == "<|endoftext|>"
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(tmp_path)
    T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="not a decoder-only causal LM"):
        load_model(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(hf_folder, dtype="int3")


def test_smollm2_alias_resolves_to_the_packaged_gguf():
    from depthlab.loading import alias_path

    path = alias_path("smollm2")
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
