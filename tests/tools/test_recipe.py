"""depthlab.tools.recipe: active parameters on target (vs a built model), valid configs, explanations, and the
warning when the data cannot feed the budget."""

from __future__ import annotations

import pytest

from depthlab.errors import ConfigError
from depthlab.model.params import param_counts
from depthlab.tools.recipe import BUNDLED_TRAIN_TOKENS, MAX_EPOCHS, data_warning, make_recipe, parse_count


@pytest.mark.parametrize("layers, target", [(2, 1e6), (8, 10e6), (12, 50e6), (32, 400e6), (16, 1e9),
                                            (32, 1.2e9), (64, 7e9)])
def test_active_params_within_10_percent_and_recipe_levers(layers, target):
    cfg, explanations = make_recipe(layers, target)
    m = cfg.model
    assert abs(param_counts(m).active_non_embedding / target - 1) < 0.10
    assert m.n_layers == layers and m.seq_len == 4096 and cfg.optimizer.weight_decay == 0.3
    assert m.n_heads == 2 * m.n_kv_heads  # GQA G = 2
    assert m.moe.top_k * 8 == m.moe.num_experts  # k/E = 1/8
    assert m.head_dim in (64, 128) and m.d_model % 64 == 0 and m.moe.expert_hidden % 64 == 0
    assert not cfg.optimizer.decay_norms and not cfg.optimizer.decay_embeddings  # decay on matrices only
    assert len(explanations) >= 8 and all(isinstance(line, str) and line for line in explanations)


def test_active_count_matches_a_built_model():
    """The accounting the recipe solves with agrees with the parameters of the model depthlab builds."""
    from depthlab.model.transformer import Transformer

    cfg, _ = make_recipe(2, "1M")
    cfg.model.vocab_size = 64
    model = Transformer(cfg.model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    moe = cfg.model.moe
    active_non_embedding = total - embedding - experts + experts * moe.top_k // moe.num_experts
    assert experts > 0
    assert param_counts(cfg.model).active_non_embedding == active_non_embedding


def test_explanations_cite_the_evidence():
    _, explanations = make_recipe(32, "1.2B", budget_tokens="1B")
    text = "\n".join(explanations)
    for evidence in ("+T4096: 39.5→40.0", "λ0.3: →41.4", "λ1.0 hurt: 38.5", "+G2: →42.1", "+MoE: →44.1",
                     "1/(lr·λ)"):
        assert evidence in text
    assert "short runs won't show it" in text


def test_budget_sets_steps_and_embeddings_can_be_counted():
    cfg, _ = make_recipe(16, "400M", budget_tokens="5.24288B")
    assert cfg.trainer.max_steps == 10_000  # 5.24288B / (128 × 4096)
    cfg, _ = make_recipe(16, "400M", count_embeddings=True)
    counts = param_counts(cfg.model)
    assert cfg.model.vocab_size == 50304 and abs(counts.active / 400e6 - 1) < 0.10


@pytest.mark.parametrize("text, value", [("400M", 400_000_000), ("1.2B", 1_200_000_000), ("1e9", 10 ** 9),
                                         ("5_000", 5000), ("2k", 2000), (3e6, 3_000_000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("args, message", [((0, "1B"), "layers"), ((8, "abc"), "expected a number"),
                                           ((8, "-5M"), "expected a number"), ((8, "0"), "positive"),
                                           ((64, "1M"), "cannot reach")])
def test_bad_input_raises_config_error(args, message):
    with pytest.raises(ConfigError, match=message):
        make_recipe(*args)


def test_data_warning_when_the_budget_needs_many_passes(tiny_dataset):
    cfg, _ = make_recipe(32, "1.2B")  # 24B tokens on the bundled 1.5M
    warning = data_warning(cfg)
    assert "far too big" in warning and "bundled Shakespeare" in warning
    assert "depthlab data prepare" in warning and "--data.path=" in warning
    tokens = cfg.trainer.max_steps * cfg.trainer.batch_size * cfg.model.seq_len
    assert f"{tokens / BUNDLED_TRAIN_TOKENS:,.0f} passes" in warning
    small, _ = make_recipe(2, "1M", budget_tokens=MAX_EPOCHS * BUNDLED_TRAIN_TOKENS // 2)
    assert data_warning(small) is None
    own, _ = make_recipe(2, "1M", budget_tokens=10e6, data=str(tiny_dataset))  # a prepared folder's own count
    assert own.data.path == str(tiny_dataset) and str(tiny_dataset) in data_warning(own)
