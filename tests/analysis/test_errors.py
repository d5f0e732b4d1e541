"""`depthlab analyze` end to end on a tiny HF folder, resume, one-line errors, and load_model paths."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from depthlab.analysis import analyze, usefulness
from depthlab.cli import main
from depthlab.errors import AnalysisError, ModelLoadError
from depthlab.loading import load_model

from .conftest import build


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer trained on a few lines, saved as a normal HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men players."]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           initializer_range=0.25)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _error_lines(stderr: str) -> list[str]:
    """depthlab's own messages (transformers may draw a weight-loading progress bar on stderr too)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("depthlab")]


def test_cli_end_to_end_and_resume(hf_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", str(hf_folder), "--metrics", "variance,angular,usefulness,causal,permutation,moe",
            "--num-samples", "3", "--seq-len", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 2  # moe asked for explicitly on a dense model: it fails, the others are saved
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "moe" in err[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"variance", "angular", "usefulness", "causal", "permutation"}
    assert len(results["model"]["weights_sha256"]) == 64 and results["sample"]["token_sha256"]
    assert results["settings"]["seq_len"] == 16 and results["versions"]["depthlab"]
    for name in ("variance.png", "usefulness.png", "causal.png", "permutation.png", "usefulness.csv",
                 "causal_matrix.csv", "metrics/usefulness.json"):
        assert (out / name).exists(), name
    argv[3] = "variance,usefulness"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "variance: already done, skipped" in printed and "effective depth:" in printed


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "nonsense"], "unknown metric"),
    (["--seq-len", "500"], "exceeds the model's context"),
    (["--seq-len", "1"], "at least 2 tokens"),
    (["--option", "usefulness.nope=1"], "has no option"),
    (["--fit-samples", "0"], "--fit-samples must be >= 1"),
    (["--fit-samples", "100000"], "fit windows were requested"),
])
def test_cli_bad_input_is_one_line_exit_2(hf_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = main(["analyze", str(hf_folder), "--out", str(out), "--num-samples", "2", "--no-progress", *argv])
    err = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "results.json").exists() and not (out / "metrics").exists()  # nothing written


def test_api_bad_inputs(ids):
    model = build("llama")
    with pytest.raises(AnalysisError, match="vocabulary"):
        usefulness(model, torch.full((2, 4), 64))
    with pytest.raises(AnalysisError, match="at least 2 tokens"):
        usefulness(model, ids[:, :1])
    with pytest.raises(AnalysisError, match="unknown metric"):
        analyze(model, ids, ["variance", "bogus"])
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(AnalysisError, match="not a causal language model"):
        usefulness(bert, ids)
    del model.model.layers
    with pytest.raises(AnalysisError, match="cannot locate the transformer blocks"):
        usefulness(model, ids)


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
