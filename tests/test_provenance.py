"""The provenance block: date, command, device, dtype, versions, and how the model's weights were obtained."""

from __future__ import annotations

import datetime

import pytest
import torch
import transformers as T

from depthlab.provenance import command_line, gguf_file_type, model_origin, provenance


def _gguf(path, file_type: int | None):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "x" * 300)
    writer.add_array("tokenizer.ggml.scores", [0.5] * 50)  # an array before the key: skipped, not misread
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("t", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_quantisation_is_read_from_the_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    assert gguf_file_type(_gguf(tmp_path / "a.gguf", gguf.LlamaFileType.MOSTLY_Q4_1)) == "Q4_1"
    assert gguf_file_type(_gguf(tmp_path / "b.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)) == "Q8_0"
    assert gguf_file_type(_gguf(tmp_path / "c.gguf", None)) is None
    (tmp_path / "d.gguf").write_bytes(b"GGUF\x03\x00")  # truncated
    assert gguf_file_type(tmp_path / "d.gguf") is None


def test_the_bundled_smollm2_is_a_q4_1_gguf():
    from depthlab.loading import alias_path

    assert gguf_file_type(alias_path("smollm2")) == "Q4_1"


def test_model_origin_and_block():
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2)).to(torch.bfloat16)
    model.source_path = "/models/SmolLM2.Q4_1.gguf"  # not a file: the quantisation is unknown
    assert model_origin(model)["origin"] == "GGUF quantised, dequantised to bf16"
    model.source_path = "/models/llama"
    block = provenance(model, argv=["/venv/bin/depthlab", "doctor", "/models/llama", "--json"])
    assert block["command"] == "depthlab doctor /models/llama --json"
    assert block["device"] == "cpu" and block["dtype"] == "bf16"
    assert block["model"] == {"ref": "/models/llama", "class": "LlamaForCausalLM", "dtype": "bf16",
                              "format": "huggingface", "origin": "Hugging Face weights (safetensors), bf16"}
    assert set(block["versions"]) >= {"depthlab", "python", "torch", "transformers"}
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(block["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)
    assert command_line(["x.py", "it's"]) == "x.py 'it'\"'\"'s'"


def test_every_results_file_carries_the_block(tiny_dataset, tmp_path, capsys):
    import json
    import random

    from depthlab.cli import main
    from depthlab.train.trainer import train
    from tests.conftest import WORDS, tiny_config

    run = tmp_path / "run"
    train(tiny_config(tiny_dataset, "--trainer.max_steps=2"), run)
    text = tmp_path / "text.txt"
    rng = random.Random(0)  # varied text: the fit and evaluation windows must not repeat each other
    text.write_text(" ".join(rng.choices(WORDS, k=3000)))
    common = ["--num-samples", "4", "--seq-len", "16", "--data", str(text), "-q", "--dtype", "fp32"]  # any CPU
    assert main(["analyze", str(run), "--metrics", "variance", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["doctor", str(run), "--json", str(tmp_path / "doctor.json"), *common]) == 0
    assert main(["prune", str(run), "--drop", "1", "--eval-samples", "2", "--out", str(tmp_path / "p"), *common]) == 0
    capsys.readouterr()
    commands = {"results.json": "analyze", "doctor.json": "doctor", "prune_report.json": "prune"}
    for path in (tmp_path / "a" / "results.json", tmp_path / "doctor.json", tmp_path / "p" / "prune_report.json"):
        block = json.loads(path.read_text())["provenance"]
        assert block["command"].split()[:2] == ["depthlab", commands[path.name]], block["command"]
        assert block["device"] == "cpu" and block["dtype"] == "fp32" and block["versions"]["depthlab"], path
        assert block["model"]["ref"] == str(run) and block["model"]["origin"] == "depthlab checkpoint, fp32", path
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["settings"]["seed"] == 0 and report["settings"]["drop"] == "1"
