"""Study specs: grid expansion, explicit runs, scales, and every bad input named in one line."""

from __future__ import annotations

import pytest
import yaml

from depthlab.errors import StudyError
from depthlab.study.runner import prepare_study, smoke_spec
from depthlab.study.spec import builtin_names, builtin_scales, dynamics_steps, load_spec

BASE = {"model": {"d_model": 32, "n_heads": 2, "seq_len": 32}, "trainer": {"max_steps": 5}}


def spec(**kw):
    return load_spec({"name": "s", "config": BASE, **kw})


def test_grid_is_the_cartesian_product_times_seeds():
    s = spec(grid={"model.n_layers": [2, 3], "optimizer.weight_decay": [0.0, 0.5]}, seeds=[0, 7])
    runs = s.resolve()
    assert [r.name for r in runs] == [
        "L2_wd0__s0", "L2_wd0__s7", "L2_wd0.5__s0", "L2_wd0.5__s7",
        "L3_wd0__s0", "L3_wd0__s7", "L3_wd0.5__s0", "L3_wd0.5__s7"]
    r = runs[5]
    assert r.label == "L3_wd0" and r.seed == 7 and r.setting == {"model.n_layers": 3, "optimizer.weight_decay": 0.0}
    assert r.config["model"]["n_layers"] == 3 and r.config["trainer"]["seed"] == 7
    assert r.config["model"]["d_model"] == 32 and r.config["trainer"]["max_steps"] == 5  # base config kept
    assert s.knobs == ["model.n_layers", "optimizer.weight_decay"]


def test_explicit_runs_with_names_and_nested_keys():
    s = spec(runs=[{"name": "dense"}, {"name": "moe", "model": {"moe": {"num_experts": 4, "top_k": 1}}}])
    runs = s.resolve()
    assert [r.name for r in runs] == ["dense", "moe"]
    assert runs[0].config["model"]["moe"]["num_experts"] == 0
    assert runs[1].config["model"]["moe"]["num_experts"] == 4 and runs[1].config["model"]["moe"]["top_k"] == 1
    assert s.knobs == ["model.moe.num_experts", "model.moe.top_k"]


def test_grid_keys_that_are_not_config_keys_are_all_named():
    with pytest.raises(StudyError, match=r"not config keys: model\.n_layer, trainer\.stepz"):
        spec(grid={"model.n_layer": [2], "trainer.stepz": [1], "model.d_model": [32]})


@pytest.mark.parametrize("grid, message", [({}, "the grid is empty"), ({"model.n_layers": []}, "no values"),
                                           (None, "exactly one of 'grid'")])
def test_empty_or_missing_grid(grid, message):
    kw = {} if grid is None else {"grid": grid}
    with pytest.raises(StudyError, match=message):
        spec(**kw)


def test_invalid_values_fail_before_anything_runs():
    with pytest.raises(StudyError, match=r"run 'L3'.*model\.d_model \(32\) must be divisible by model\.n_heads \(3\)"):
        spec(runs=[{"name": "L3", "model.n_heads": 3}])
    with pytest.raises(StudyError, match="unknown spec key"):
        spec(grid={"model.n_layers": [2]}, sedes=[1])
    with pytest.raises(StudyError, match="measure.analysis"):
        spec(grid={"model.n_layers": [2]}, measure={"analysis": ["usefulnes"]})
    with pytest.raises(StudyError, match="measure.eval_tasks"):
        spec(grid={"model.n_layers": [2]}, measure={"eval_tasks": ["arc_hard"]})
    with pytest.raises(StudyError, match="duplicate seeds"):
        spec(grid={"model.n_layers": [2]}, seeds=[1, 1])


def test_run_names_must_be_folder_names_but_may_hold_html():
    with pytest.raises(StudyError, match="cannot be a folder name"):
        spec(runs=[{"name": "a/b"}])
    with pytest.raises(StudyError, match="both named"):
        spec(runs=[{"name": "x"}, {"name": "x", "model.n_layers": 3}])
    assert spec(runs=[{"name": "<b>&x"}]).resolve()[0].name == "<b>&x"


def test_builtin_studies_resolve_at_every_scale():
    assert set(builtin_names()) >= {"depth", "weight_decay", "context", "gqa", "moe", "recipe"}
    for name in builtin_names():
        scales = builtin_scales(name)
        assert set(scales) == {"tiny", "small", "paper"} and scales["small"]["gpu_hours"] > 0, name
        for scale in scales:
            s = load_spec(name, scale)
            assert s.resolve() and s.scale == scale and s.runtime
        tiny = load_spec(name, "tiny")
        assert len(tiny.seeds) >= (3 if name in ("depth", "weight_decay") else 2), name  # seeds for intervals
        assert tiny.measure.fit_samples is None  # the analysis default: 32·(d+1) fit tokens per map
    depth = load_spec("depth", "tiny")
    assert [r.config["model"]["n_layers"] for r in depth.resolve()] == [2, 2, 2, 4, 4, 4, 8, 8, 8]  # 3 seeds
    tiny_run = depth.resolve()[0].config
    assert tiny_run["model"]["d_model"] == 128 and tiny_run["trainer"]["max_steps"] == 600  # the scale's config
    assert tiny_run["optimizer"]["lr"] == 3e-3  # the tiny preset underneath
    assert depth.measure.analysis_options["jacobian"]["probes"] == 16  # the common measure under the scale's
    assert depth.measure.dynamics == [0.25, 0.5, 0.75] and depth.measure.analysis_samples == 16
    assert [r.config["model"]["n_layers"] for r in load_spec("depth", "paper").resolve()] == [12, 16, 24, 32]
    with pytest.raises(StudyError, match="no scale 'huge'"):
        load_spec("depth", "huge")
    with pytest.raises(StudyError, match="unknown study"):
        load_spec("depht")


def test_folder_of_another_spec_is_refused_showing_the_difference(tmp_path):
    prepare_study(spec(grid={"model.n_layers": [2, 3]}), tmp_path)
    prepare_study(spec(grid={"model.n_layers": [2, 3]}), tmp_path)  # the same spec again is fine
    recorded = yaml.safe_load((tmp_path / "study.yaml").read_text())
    assert recorded["grid"] == {"model.n_layers": [2, 3]}
    prepare_study(spec(grid={"model.n_layers": [2, 3]}, description="reworded"), tmp_path)  # descriptive: accepted
    assert yaml.safe_load((tmp_path / "study.yaml").read_text())["description"] == "reworded"
    with pytest.raises(StudyError, match=r"different study spec \(grid\.model\.n_layers: \[2, 3\] → \[2, 4\]"):
        prepare_study(spec(grid={"model.n_layers": [2, 4]}), tmp_path)
    retention = {**BASE, "trainer": {**BASE.get("trainer", {}), "keep_last": 7, "keep_every": 2}}
    prepare_study(load_spec({"name": "s", "config": retention, "grid": {"model.n_layers": [2, 3]}}),
                  tmp_path)  # checkpoint retention does not change results: accepted
    with pytest.raises(StudyError, match=r"config\.trainer\.max_steps: 5 → 9"):
        prepare_study(load_spec({"name": "s", "config": {**BASE, "trainer": {"max_steps": 9}},
                                 "grid": {"model.n_layers": [2, 3]}}), tmp_path)


def test_dynamics_checkpoints_must_be_kept_by_the_trainer():
    fine = spec(grid={"model.n_layers": [2]}, measure={"dynamics": [0.5, 0.25], "dynamics_analysis": "usefulness"},
                config={**BASE, "trainer": {**BASE["trainer"], "save_interval": 1, "keep_last": 5}})
    assert fine.measure.dynamics == [0.25, 0.5] and fine.measure.dynamics_analysis == ["usefulness"]
    assert dynamics_steps(fine.measure.dynamics, 8) == [2, 4] and dynamics_steps([0.01, 0.99], 4) == [1, 3]
    # BASE trains 5 steps: 0.2 → step 1; save_interval 1, keep_last 2 keeps steps 4 and 5 only …
    with pytest.raises(StudyError, match=r"checkpoints of steps \[1\].*would not keep \[1\].*keep_every \(now 0\)"):
        spec(grid={"model.n_layers": [2]}, measure={"dynamics": [0.2]}, config={**BASE, "trainer": {
            **BASE["trainer"], "save_interval": 1}})
    # … unless keep_every keeps it
    assert spec(grid={"model.n_layers": [2]}, measure={"dynamics": [0.2, 0.4]}, config={**BASE, "trainer": {
        **BASE["trainer"], "save_interval": 1, "keep_every": 1}}).measure.dynamics == [0.2, 0.4]
    with pytest.raises(StudyError, match=r"make trainer.save_interval \(now 2\) and trainer.keep_every"):
        spec(grid={"model.n_layers": [2]}, measure={"dynamics": [0.2]}, config={**BASE, "trainer": {
            **BASE["trainer"], "save_interval": 2, "keep_last": 9}})
    for bad in ([1.0], [0], "half", [True]):
        with pytest.raises(StudyError, match="measure.dynamics must be a list of fractions"):
            spec(grid={"model.n_layers": [2]}, measure={"dynamics": bad})
    with pytest.raises(StudyError, match="'gpu_hours' must be a positive number"):
        spec(grid={"model.n_layers": [2]}, gpu_hours="soon")


def test_smoke_spec_is_the_largest_run_for_two_steps():
    for name in builtin_names():
        smoke = smoke_spec(load_spec(name, "small"))
        (run,) = smoke.resolve()
        t = run.config["trainer"]
        assert t["max_steps"] == 2 and not t["compile"] and smoke.measure.analysis_samples <= 2, name
    depth = smoke_spec(load_spec("depth", "small"))
    assert depth.resolve()[0].name == "L32" and depth.measure.analysis_options["permutation"] == {"pairs": "adjacent"}
    assert depth.measure.analysis_options["jacobian"] == {"mode": "estimate", "probes": 2}
    assert smoke_spec(load_spec("context", "small")).resolve()[0].name == "T8192"
    assert len(smoke_spec(load_spec("gqa", "small"), all_runs=True).resolve()) == 3
    with pytest.raises(StudyError, match="--steps must be >= 1"):
        smoke_spec(load_spec("gqa", "small"), steps=0)


def test_fit_sample_sizes_are_positive_integers_or_the_default():
    assert spec(grid={"model.n_layers": [2]}, measure={"fit_samples": 40, "fit_seq_len": 64}).measure.fit_samples == 40
    for key, bad in (("fit_samples", 0), ("fit_seq_len", "long"), ("analysis_samples", None)):
        with pytest.raises(StudyError, match=f"measure.{key} must be a positive integer"):
            spec(grid={"model.n_layers": [2]}, measure={key: bad})
