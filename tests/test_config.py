import pytest

from depthlab import config as cfgmod
from depthlab.config import Config, load_config, parse_overrides
from depthlab.errors import ConfigError


def test_every_field_has_a_docstring():
    for key, _type, _default, doc in cfgmod.describe():
        assert doc, f"{key} has no docstring"


def test_presets_load_and_validate():
    names = cfgmod.preset_names()
    assert {"tiny", "small", "paper-1b", "paper-moe-1b7b", "paper-recipe-32l"} <= set(names)
    for name in names:
        load_config(name)
    paper = load_config("paper-1b")
    assert (paper.model.d_model, paper.model.n_layers, paper.model.hidden, paper.model.vocab_size) == (
        2048, 16, 8192, 50304)
    recipe = load_config("paper-recipe-32l")
    assert recipe.model.n_heads // recipe.model.kv_heads == 2 and recipe.model.moe.top_k / recipe.model.moe.num_experts == 1 / 8


def test_dotted_overrides_with_types():
    cfg = load_config("tiny", ["--model.n_layers=32", "--optimizer.weight_decay", "0.3", "--model.lns=true",
                               "--optimizer.betas=[0.9, 0.99]", "--model.moe.num_experts=8"])
    assert cfg.model.n_layers == 32 and cfg.optimizer.weight_decay == 0.3 and cfg.model.lns is True
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.model.moe.num_experts == 8
    assert isinstance(cfg.optimizer.weight_decay, float)


def test_ints_are_accepted_for_floats_but_not_the_reverse():
    assert load_config(None, {"optimizer.weight_decay": 1}).optimizer.weight_decay == 1.0
    with pytest.raises(ConfigError, match="model.n_layers: expected int"):
        load_config(None, {"model.n_layers": 2.5})
    with pytest.raises(ConfigError, match="model.lns: expected bool"):
        load_config(None, {"model.lns": "yes please"})


@pytest.mark.parametrize("overrides, message", [
    ({"model.n_layer": 3}, "unknown config key 'model.n_layer' (did you mean 'model.n_layers'?)"),
    ({"optimizer.weight_decy": 3}, "did you mean 'optimizer.weight_decay'"),
    ({"model.n_kv_heads": 3}, "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    ({"model.n_heads": 3}, "model.d_model (128) must be divisible by model.n_heads (3)"),
    ({"model.norm": "sandwich"}, "model.norm must be one of pre|post|mix|peri"),
    ({"model.moe.num_experts": 4, "model.moe.top_k": 5}, "model.moe.top_k (5) must be between 1"),
    ({"trainer.batch_size": 32, "trainer.micro_batch_size": 5}, "divisible by trainer.micro_batch_size"),
    ({"trainer.dtype": "fp16"}, "trainer.dtype must be one of auto|bf16|fp32"),
    ({"optimizer.eps": 0.0}, "optimizer.eps must be positive, got 0.0"),
    ({"model.rope_theta": float("nan")}, "model.rope_theta must be a finite number"),
    ({"model.norm_eps": -1e-6}, "model.norm_eps must be >= 0"),
    ({"trainer.seed": 2**70}, "trainer.seed must be at most 9223372036854775807 (int64)"),
    ({"trainer.log_interval": 0}, "trainer.log_interval must be positive"),
    ({"trainer.eval_batches": 0}, "trainer.eval_batches must be positive"),
    ({"optimizer.lr": 10**400}, "optimizer.lr must be a finite number, got a 401-digit number"),
    ({"optimizer.lr": -1.0}, "optimizer.lr must be positive"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="unknown preset 'tinyy' \\(did you mean 'tiny'\\?\\)"):
        load_config("tinyy")


def test_round_trip_and_diff(tmp_path):
    cfg = load_config("tiny", ["--model.n_layers=8"])
    path = tmp_path / "c.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg
    assert cfgmod.diff(cfg, Config()) and "model.n_layers: 8 → 4" in cfgmod.diff(cfg, Config())


def test_parse_overrides_rejects_positional_junk():
    assert parse_overrides(["--a.b=1", "--c.d", "x"]) == {"a.b": 1, "c.d": "x"}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["n_layers=3"])


def test_every_numeric_or_closed_string_field_declares_its_bound():
    """The bad-input matrix relies on this: each int/float field has a range, each non-free string its choices."""
    free_strings = {"data.path", "logging.wandb_project", "trainer.device"}  # a path, a name, a device pattern
    for key, type_name, default, _doc in cfgmod.describe():
        if type_name in ("int", "float") or type_name == "str" and key not in free_strings:
            bound = cfgmod.bound_of(key)
            assert bound is not None, f"{key} declares no range or choices"
            bound.check(key, default)  # the default itself is valid


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  n_layers: 2\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'n_layers'"):
        load_config(path)
