"""A model split over CPU and disk by accelerate gives every metric the numbers of the same model in memory."""

from __future__ import annotations

import pytest
import torch

from depthlab.analysis.suite import analyze
from depthlab.errors import ModelLoadError
from depthlab.loading import load_model, weights_hash
from depthlab.model.dispatch import is_dispatched, parse_size
from tests.analysis.conftest import V, build

METRICS = ["variance", "usefulness", "causal", "permutation", "lens"]
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    build("llama").save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(V)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # every word a token (unknown words are t0)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


def numbers(results: dict) -> dict[str, float]:
    """Every number in {metric: Result or its dict}, by path (None as NaN)."""
    out = {}

    def walk(path, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        elif value is None or isinstance(value, int | float) and not isinstance(value, bool):
            out[path] = float("nan") if value is None else float(value)

    for name, result in results.items():
        walk(name, result if isinstance(result, dict) else result.to_dict())
    return out


def test_cpu_disk_split_matches_in_memory(saved, tmp_path):
    ids = torch.randint(0, V, (6, 8), generator=torch.Generator().manual_seed(3))
    fit = torch.randint(0, V, (24, 8), generator=torch.Generator().manual_seed(4))
    whole, _ = load_model(saved)
    split, _ = load_model(saved, device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert is_dispatched(split) and split.model.layers[1].self_attn.q_proj.weight.is_meta
    assert weights_hash(split) == weights_hash(whole)
    opts = {"permutation": {"pairs": "all"}, "usefulness": {"bootstrap": 50}}
    a = numbers(analyze(whole, ids, METRICS, fit_ids=fit, options=opts, micro_batch_size=4))
    b = numbers(analyze(split, ids, METRICS, fit_ids=fit, options=opts, micro_batch_size=4))
    assert a.keys() == b.keys() and len(a) > 10
    for key, x in a.items():
        assert b[key] == pytest.approx(x, rel=1e-5, abs=1e-6, nan_ok=True), key
    # The swaps really ran other weights (a no-op swap would give score 0 everywhere).
    assert max(abs(v) for k, v in b.items() if k.startswith("permutation.scores")) > 1e-3


def test_bad_placements_are_one_line_errors(saved, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(saved, device_map={**SPLIT, "model.layers.0": "cuda:7"}, offload_folder=tmp_path)
    with pytest.raises(ModelLoadError, match="offload folder"):
        load_model(saved, device_map=SPLIT)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ModelLoadError, match="offload folder"):
        load_model(saved, device_map=SPLIT, offload_folder=blocked / "sub")
    with pytest.raises(ModelLoadError, match="smaller than one block"):
        load_model(saved, device_map="auto", max_memory={"cpu": "1KiB"}, offload_folder=tmp_path)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1e3") == 1000
    with pytest.raises(ModelLoadError, match="cannot read"):
        parse_size("2 parsecs")


def test_cli_offloaded_analysis_and_bad_input(saved, tmp_path, capsys):
    import json

    from depthlab.cli import main

    common = [str(saved), "--metrics", "variance,permutation", "--num-samples", "2", "--seq-len", "8", "-q",
              "--device", "cpu", "--dtype", "fp32"]
    split = json.dumps(SPLIT)
    for bad, message in ((["--device-map", split.replace('"disk"', '"cuda:5"', 1)], "does not exist"),
                         (["--device-map", split, "--offload-folder", str(tmp_path / "f" / "x")], "offload folder"),
                         (["--device-map", "auto", "--max-memory", "cpu=1KiB"], "smaller than one block"),
                         (["--cache-budget", "lots"], "cannot read")):
        if bad[-1].endswith("x"):
            (tmp_path / "f").write_text("")  # a file where the offload folder's parent should be
        out = tmp_path / "bad"
        assert main(["analyze", *common, *bad, "--out", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("depthlab analyze: error:") and message in err[0], err
        assert not out.exists()
    out = tmp_path / "run"
    assert main(["analyze", *common, "--device-map", split, "--offload-folder", str(tmp_path / "off"),
                 "--cache-budget", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["memory"]["peak_rss_bytes"] > 2**20
    assert results["provenance"]["device_map"]["model.layers.2"] == "disk"


def test_native_model_dispatched_to_disk(tmp_path):
    from depthlab.model.dispatch import dispatch

    ids = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(5))
    device_map = {"rotary": "cpu", "embed": "cpu", "blocks.0": "disk", "blocks.1": "cpu", "blocks.2": "disk",
                  "norm": "cpu", "lm_head": "cpu"}
    split = dispatch(build("depthlab"), device_map, str(tmp_path), None, ["Block"])
    opts = {"permutation": {"pairs": "all"}}
    a = numbers(analyze(build("depthlab"), ids, ["causal", "permutation"], options=opts))
    b = numbers(analyze(split, ids, ["causal", "permutation"], options=opts))
    assert a.keys() == b.keys()
    for key, x in a.items():
        assert b[key] == pytest.approx(x, rel=1e-5, abs=1e-6, nan_ok=True), key
