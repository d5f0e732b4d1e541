"""`depthlab prune`: the right blocks go, the kept weights are the originals', caches stay consistent, outputs equal
the original model with those blocks skipped, saved folders reload, and bad block lists are one-line errors."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from depthlab.analysis import angular_distance, usefulness
from depthlab.analysis.engine import Engine
from depthlab.config import ModelConfig
from depthlab.errors import AnalysisError
from depthlab.loading import load_model
from depthlab.model.transformer import Transformer
from depthlab.tools.prune import PruneError, parse_blocks, prune, save_pruned

from .conftest import llama

V = 64


def skipped_logits(model, ids, dropped):
    """Reference: the original model's logits with the dropped blocks replaced by the identity (engine resume)."""
    eng = Engine(model, ids)
    base = next(eng.baselines())
    h = eng.resume(base, 0, base.hs[0], {b: None for b in dropped})
    return eng.stack.final(h)


def logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "generation_config") else model(ids)
    return out.logits


def depthlab_model(**overrides):
    torch.manual_seed(0)
    settings = {"vocab_size": V, "d_model": 16, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "seq_len": 32,
                "init_std": 0.25, **overrides}
    cfg = ModelConfig(**settings)
    return Transformer(cfg).eval()


IDS = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec, expected", [("3", [3]), ("3,5-7", [3, 5, 6, 7]), (" 1 - 2 ,0", [0, 1, 2]),
                                            ("2,2,1-2", [1, 2])])
def test_parse_blocks(spec, expected):
    assert parse_blocks(spec, 8) == expected


@pytest.mark.parametrize("spec, message", [("0-7", "cannot drop all"), ("8", "out of range"), ("3-9", "out of range"),
                                           ("a", "malformed"), ("1,,2", "malformed"), ("5-3", "start after end"),
                                           ("-1", "malformed")])
def test_parse_blocks_refuses(spec, message):
    with pytest.raises(PruneError, match=message):
        parse_blocks(spec, 8)


def test_hf_prune_removes_the_right_blocks_and_keeps_cache_consistent():
    model = llama(V, layers=4)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, sel = prune(model, "1,2")
    assert sel.dropped == [1, 2] and sel.method == "list"
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    for j, i in enumerate([0, 3]):  # kept blocks carry the originals' weights, renumbered
        for name, value in pruned.model.layers[j].state_dict().items():
            assert torch.equal(value, original[f"model.layers.{i}.{name}"]), name
    assert torch.equal(pruned.lm_head.weight, original["lm_head.weight"])
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # the original is untouched
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name])
    torch.testing.assert_close(logits(pruned, IDS), skipped_logits(model, IDS, [1, 2]), rtol=1e-5, atol=1e-5)
    prompt = IDS[:1, :5]
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with_cache = pruned.generate(prompt, use_cache=True, **kwargs)
    without = pruned.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_hf_prune_subsets_per_layer_config_and_reloads(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=0.25, use_sliding_window=True, sliding_window=4,
                        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    pruned, _ = prune(model, [0, 3])
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]
    assert save_pruned(pruned, tokenizer, tmp_path / "out") == "hf"
    reloaded, tok = load_model(tmp_path / "out")
    assert len(tok) == len(tokenizer)
    ids = IDS % len(tokenizer)
    torch.testing.assert_close(logits(reloaded, ids), skipped_logits(model, ids, [0, 3]), rtol=1e-5, atol=1e-5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reloaded.generate(ids[:1], use_cache=True, **kwargs),
                       reloaded.generate(ids[:1], use_cache=False, **kwargs))


@pytest.mark.parametrize("overrides", [{}, {"lns": True}, {"norm": "mix", "mix_fraction": 0.4, "lns": True},
                                       {"moe": {"num_experts": 4, "top_k": 2}, "lns": True}])
def test_depthlab_prune_equals_skipping_the_blocks(overrides):
    if "moe" in overrides:
        from depthlab.config import MoEConfig

        overrides = {**overrides, "moe": MoEConfig(**overrides["moe"])}
    model = depthlab_model(**overrides)
    dropped = [0, 3]
    pruned, _ = prune(model, dropped)
    assert pruned.config.n_layers == 3
    assert [b.placement for b in pruned.blocks] == [model.blocks[i].placement for i in (1, 2, 4)]
    if not model.config.lns:
        for j, i in enumerate((1, 2, 4)):
            for name, value in pruned.blocks[j].state_dict().items():
                assert torch.equal(value, model.blocks[i].state_dict()[name]), name
    torch.testing.assert_close(pruned(IDS).logits, skipped_logits(model, IDS, dropped), rtol=1e-4, atol=1e-4)


def test_depthlab_saves_hf_when_exportable_else_a_run_folder(tmp_path, tokenizer):
    for overrides, kind in (({}, "hf"), ({"lns": True}, "depthlab")):
        model = depthlab_model(vocab_size=len(tokenizer), n_layers=4, **overrides)
        pruned, _ = prune(model, "2")
        out = tmp_path / kind
        assert save_pruned(pruned, tokenizer, out) == kind
        reloaded, _ = load_model(out)
        assert reloaded.config.num_hidden_layers == 3 if kind == "hf" else reloaded.config.n_layers == 3
        ids = IDS % len(tokenizer)
        torch.testing.assert_close(logits(reloaded, ids), skipped_logits(model, ids, [2]), rtol=1e-4, atol=1e-4)
        if kind == "hf":
            kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
            assert torch.equal(reloaded.generate(ids[:1], use_cache=True, **kwargs),
                               reloaded.generate(ids[:1], use_cache=False, **kwargs))


def test_auto_selection_follows_the_metrics():
    model = llama(V, layers=6)
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(2))
    fit = torch.randint(0, V, (12, 16), generator=torch.Generator().manual_seed(3))  # 192 >= 10·(d+1) fit tokens
    ratios = usefulness(model, ids, fit_ids=fit, bootstrap=0).loss_ratios
    _, sel = prune(model, "auto", input_ids=ids, fit_ids=fit, n=2)
    assert sel.dropped == sorted(sorted(range(6), key=ratios.__getitem__)[:2])
    assert sel.scores == pytest.approx(ratios)
    with pytest.raises(AnalysisError, match="prune --drop auto refuses .* unreliable .* 48 tokens"):
        prune(model, "auto", input_ids=ids, n=2)  # cross-fitted 4x16: 48 fit tokens per map
    window = angular_distance(model, ids).best_window(3)
    _, sel = prune(model, "auto", input_ids=ids, n=3, method="angular")
    assert sel.dropped == window["blocks"] == list(range(window["start"], window["start"] + 3))
    with pytest.raises(PruneError, match="between 1 and 5"):
        prune(model, "auto", input_ids=ids, n=6)
    with pytest.raises(PruneError, match="calibration sample"):
        prune(model, "auto", n=1)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "olmo2", "neox", "mixtral"])
def test_other_hf_families_stay_cache_consistent(family):
    from tests.analysis.conftest import build

    model = build(family)
    pruned, _ = prune(model, "1")
    assert pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(pruned, IDS), skipped_logits(model, IDS, [1]), rtol=1e-5, atol=1e-5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(pruned.generate(IDS[:1, :5], use_cache=True, **kwargs),
                       pruned.generate(IDS[:1, :5], use_cache=False, **kwargs))
