"""Bad-input matrix: every malformed input to every subcommand is one line on stderr, exit code 2, no traceback, and
leaves every file as it was.

Most cases are generated: every config key × boundary values (0, −1, NaN, ±inf, huge, wrong type, empty string) on
the validate-only paths (`config`, `train`, `study run`), every analysis option × wrong types, every subcommand that
writes a folder × unusable ``--out`` paths, and every model-reading subcommand × damaged model files. A hand-written
list adds the cases that need a specific setting. Each case runs in-process through `depthlab.cli.main` (fast); a few
run through ``python -m depthlab`` to check the real process boundary. A case that starts real work (a model built
for training, a study's runs launched, the demo) fails at once instead of running it.

Placeholders: {t} the workspace folder, {run} a trained tiny run in it, {data} a prepared dataset, {corpus} that
dataset's text corpus, {ro} a read-only folder.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from depthlab import config as cfgmod
from depthlab.cli import main
from depthlab.cli.common import Number
from depthlab.errors import ConfigError
from tests.reliability.conftest import snapshot

TRAIN = ["train", "{t}/cfg.yaml", "--out", "{t}/new"]


# ----------------------------------------------------------------------------------------------------------------
# Generated: config keys × boundary values


def _rejected(key: str, value) -> bool:
    """Whether the key's declared bound refuses `value` (0 and -1 are only bad inputs where the bound says so)."""
    bound = cfgmod.bound_of(key)
    if bound is None:
        return False
    try:
        bound.check(key, value)
    except ConfigError:
        return True
    return False


def bad_values(key: str, type_name: str) -> list[str]:
    """Override values (YAML text) that `key` must refuse."""
    huge_int, huge = str(2**64), str(10**400)
    if type_name == "int":
        values = ["abc", "1.5", ".nan", ".inf", "-.inf", "''", "[1]", huge_int]
    elif type_name == "float":
        values = ["abc", ".nan", ".inf", "-.inf", "''", "[1]", huge, "1e400"]
    elif type_name == "bool":
        values = ["abc", "2", "0", "-1", ".nan", "''", "[1]"]
    elif type_name.startswith("tuple"):
        values = ["abc", "''", "[.nan, 0.9]", "[0.9]", "[1.5, 0.9]", "[-1, 0.9]", "[0.9, .inf]"]
    elif cfgmod.bound_of(key) is not None or key == "trainer.device":
        values = ["''", "nope", "0", "-1", "[1]"]
    else:  # a free string (a path, a project name): only the wrong type is an error
        values = ["[1]", "{a: 1}"]
    if type_name in ("int", "float"):
        values += [v for v in ("0", "-1") if _rejected(key, float(v) if type_name == "float" else int(v))]
    return values


CONFIG_CASES = [(key, value) for key, type_name, _default, _doc in cfgmod.describe()
                for value in bad_values(key, type_name)]
CONFIG_COMMANDS = {"config": ["config", "tiny"], "train": TRAIN,
                   "study run": ["study", "run", "{t}/spec_ok.yaml", "--out", "{t}/s"]}


# ----------------------------------------------------------------------------------------------------------------
# Generated: analysis options × wrong types


def _option_cases() -> list[tuple[str, str]]:
    from depthlab.analysis.suite import METRICS, OPTION_BOUNDS

    wrong = {bool: ["1", '"yes"'], int: ['"abc"', "1.5", "NaN", "true", str(2**64)], float: ['"abc"', "NaN",
             "Infinity", "-Infinity", "true"], str: ["1", "[1]"]}
    cases = []
    for metric, fn in METRICS.items():
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind == p.KEYWORD_ONLY and name not in ("engine", "progress") and type(p.default) in wrong:
                cases += [(f"{metric}.{name}", v) for v in wrong[type(p.default)]]
                bound = OPTION_BOUNDS.get(name)
                if bound is not None:  # values outside the declared range: 0, -1, above the top
                    edges = [0, -1, *([bound.hi * 2] if bound.hi is not None else [])]
                    cases += [(f"{metric}.{name}", json.dumps(v)) for v in edges if _outside(bound, v)]
    return cases


def _outside(bound, value) -> bool:
    try:
        bound.check("x", value)
    except ConfigError:
        return True
    return False


OPTION_CASES = _option_cases()


# ----------------------------------------------------------------------------------------------------------------
# Generated: every numeric option of every subcommand (a `common.Number`, whose bound is declared beside it) ×
# boundary values; the parser refuses them, so each case is validate-only by construction


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand's parser by its name ("eval", "data prepare", ...)."""
    from depthlab.cli import build_parser

    found, todo = {}, [((), build_parser())]
    while todo:
        path, parser = todo.pop()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            found[" ".join(path)] = parser
        for action in subs:
            todo += [((*path, name), sub) for name, sub in action.choices.items()]
    return found


def _bad_numbers(number: Number) -> list[str]:
    """Values a `Number` option must refuse: wrong type, empty, NaN, ±inf, huge, and 0/−1/beyond its bound."""
    values = ["abc", "", "nan", "inf", "-inf"] + (["1.5", str(2**64)] if number.kind is int else ["1e400"])
    for v in (0, -1, *((number.bound.hi + 1,) if number.bound.hi is not None else ())):
        try:
            number(str(v))
        except argparse.ArgumentTypeError:
            values.append(str(v))
    return values


NUMERIC_OPTIONS = {(name, max(a.option_strings, key=len), a.type) for name, parser in _subcommands().items()
                   for a in parser._actions if isinstance(a.type, Number)}
NUMERIC_CASES = sorted((name, flag, value) for name, flag, number in NUMERIC_OPTIONS for value in _bad_numbers(number))


def _positionals(name: str) -> list[str]:
    """Placeholder values for a subcommand's positional arguments (parsing stops at the bad option first)."""
    parser = _subcommands()[name]
    return [a.choices and next(iter(a.choices)) or "x" for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
            and a.nargs not in ("?", "*", argparse.REMAINDER)]


# ----------------------------------------------------------------------------------------------------------------
# Generated: unusable --out paths × every subcommand that writes a folder (or a file)

WRITERS = {
    "train": ["train", "{t}/cfg.yaml"],
    "analyze": ["analyze", "{run}"],
    "eval": ["eval", "{run}", "--tasks", "piqa", "--limit", "2"],
    "prune": ["prune", "{run}", "--drop", "1"],
    "export": ["export", "{run}"],
    "theory": ["theory"],
    "data prepare": ["data", "prepare", "--source", "{corpus}"],
    "study run": ["study", "run", "{t}/spec_ok.yaml"],
    "report": ["report", "{t}/empty"],
    "demo": ["demo"],
}
BAD_OUTS = [("", "is empty"), ("/", "filesystem root"), ("{t}/afile", "is a file"),
            ("{t}/afile/sub", "is a file, not a folder"), ("{t}/dangling", "dangling"),
            ("{t}/" + "x" * 300, "too long"), ("{ro}/out", "read-only")]
OUT_CASES = [(cmd, out, msg) for cmd in WRITERS for out, msg in BAD_OUTS]
FILE_OUT_CASES = [("", "is empty"), ("/", "filesystem root"), ("{t}/empty", "is a folder"),
                  ("{t}/afile/x.yaml", "is a file, not a folder"), ("{t}/dangling", "dangling"),
                  ("{ro}/x.yaml", "read-only")]


# ----------------------------------------------------------------------------------------------------------------
# Generated: damaged model files × every subcommand that reads a model

READERS = {"sample": ["sample", "{m}"], "analyze": ["analyze", "{m}", "--out", "{t}/a"],
           "eval": ["eval", "{m}", "--tasks", "piqa", "--limit", "2"], "doctor": ["doctor", "{m}"],
           "prune": ["prune", "{m}", "--drop", "1", "--out", "{t}/p"], "export": ["export", "{m}", "--out", "{t}/hf"]}
DAMAGED = [("{t}/garbage.gguf", "garbage.gguf"), ("{t}/header.gguf", "header.gguf"),
           ("{t}/truncated.gguf", "truncated.gguf"), ("{t}/hfbadweights", "model.safetensors"),
           ("{t}/torntok", "tokenizer.json"), ("{t}/torncfg", "config.yaml")]
MODEL_CASES = [(cmd, model, msg) for cmd in READERS for model, msg in DAMAGED
               if cmd != "export" or "torn" in model]  # export reads depthlab runs only

# ----------------------------------------------------------------------------------------------------------------
# Hand-written: the cases that need a particular setting

CASES = [
    # config files
    (["train", "{t}/bad.yaml", "--out", "{t}/new"], "malformed YAML"),
    (["train", "{t}/list.yaml", "--out", "{t}/new"], "expected a mapping"),
    (["train", "{t}/type.yaml", "--out", "{t}/new"], "model.n_layers: expected int"),
    (["train", "{t}/dup.yaml", "--out", "{t}/new"], "duplicate key 'n_layers'"),
    (["train", "{t}/binary.yaml", "--out", "{t}/new"], "cannot read config file"),
    (["train", "{t}/empty", "--out", "{t}/new"], "cannot read config file"),
    (["train", "{t}/missing.yaml", "--out", "{t}/new"], "config file not found"),
    (["train", "{t}/cfg.yaml", "--preset", "tiny", "--out", "{t}/new"], "not both"),
    (["config", "nope"], "unknown preset 'nope'"),
    # overrides: syntax and cross-field rules
    ([*TRAIN, "--model.n_layers"], "has no value"),
    ([*TRAIN, "--model.n_heads=3"], "divisible by model.n_heads"),
    ([*TRAIN, "--model.moe.top_k=5", "--model.moe.num_experts=4"], "top_k"),
    ([*TRAIN, "--model.moe.lb_weight=0.5"], "model.moe.num_experts is 0"),
    ([*TRAIN, "--model.vocab_size=10"], "smaller than the dataset"),
    ([*TRAIN, "--trainer.micro_batch_size=3"], "divisible"),
    ([*TRAIN, "--trainer.device=cuda"], "CUDA is not available"),
    ([*TRAIN, "--optimizer.betas=[0.9, 1.5]"], "optimizer.betas"),
    ([*TRAIN, "--foo.bar=1"], "unknown config key"),
    ([*TRAIN, "--model.n_layer=3"], "did you mean"),
    # resources: refused before anything is allocated
    ([*TRAIN, "--model.n_layers=10000000"], "needs about"),
    ([*TRAIN, "--model.d_model=1000000000", "--model.n_heads=2"], "needs about"),
    ([*TRAIN, "--model.vocab_size=1000000000000"], "needs about"),
    ([*TRAIN, "--trainer.batch_size=1000000000000"], "needs about"),
    ([*TRAIN, "--model.seq_len=1000000000"], "needs about"),
    # run folders and data paths
    (["train", "{t}/cfg.yaml", "--out", "{t}/new", "--resume"], "nothing to resume"),
    (["train", "{t}/cfg.yaml", "--out", "{run}"], "already holds a run"),
    (["train", "{t}/cfg.yaml", "--out", "{run}", "--resume", "--model.n_layers=3"], "config differs"),
    ([*TRAIN, "--data.path={t}/afile"], "is a file"),
    ([*TRAIN, "--data.path={t}/baddata"], "corrupt"),
    ([*TRAIN, "--data.path={t}/empty"], "is empty"),
    ([*TRAIN, "--data.path={t}/missing"], "{t}/missing"),
    (["data", "prepare", "--source", "{t}/missing", "--out", "{t}/p"], "not found"),
    (["data", "prepare", "--source", "{t}/empty", "--out", "{t}/p"], "has no .txt"),
    (["data", "prepare", "--source", "{t}/bad.jsonl", "--out", "{t}/p"], "not valid JSON"),
    (["data", "prepare", "--source", "{t}/nofield.jsonl", "--out", "{t}/p"], "no 'text' field"),
    (["data", "prepare", "--source", "{corpus}", "--vocab-size", "0", "--out", "{t}/p"], "too small"),
    (["data", "prepare", "--source", "{corpus}", "--vocab-size", str(10**11), "--out", "{t}/p"], "too large"),
    (["train", "--preset", "", "--out", "{t}/new"], "--preset is empty"),
    (["train", "{t}/cfg.yaml", "--preset", "", "--out", "{t}/new"], "not both"),
    (["data", "info", "{t}/listmeta"], "not a depthlab dataset description"),
    (["eval", "{run}", "--ppl-data", "{t}/listmeta"], "not a depthlab dataset description"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/listmeta", "--out", "{t}/a"],
     "not a depthlab dataset description"),
    ([*TRAIN, "--data.path={t}/tornmeta_tok"], "tokenizer.json is corrupt"),
    (["prune", "{run}", "--drop", "0,0", "--out", "{t}/p"], "exceeds the model's context"),
    (["analyze", "{run}", "--seq-len", "16", "--device-map", "auto", "--offload-folder", "", "--out", "{t}/a"],
     "offload folder is empty"),
    (["compare", "{run}", "{run}", "--markdown", ""], "--markdown is empty"),
    (["data", "prepare", "--source", "{corpus}", "--val-fraction", "1.5", "--out", "{t}/p"], "val_fraction"),
    (["data", "prepare", "--source", "{corpus}", "--val-fraction", "-0.1", "--out", "{t}/p"], "val_fraction"),
    (["data", "prepare", "--source", "{corpus}", "--val-fraction", "nan", "--out", "{t}/p"], "val_fraction"),
    (["data", "prepare", "--source", "{corpus}", "--tokenizer", "{t}/missing.json", "--out", "{t}/p"],
     "does not exist"),
    (["data", "prepare", "--source", "{corpus}", "--vocab-size", "260", "--out", "{data}"], "different dataset"),
    (["data", "info", "{t}/missing"], "does not exist"),
    (["data", "info", "{t}/baddata"], "corrupt"),
    # model paths and sampling
    (["sample", "{t}/missing"], "no such model"),
    (["sample", "{t}/empty"], "neither a depthlab run"),
    (["sample", "{t}/hfbad"], "not a valid JSON"),
    (["sample", "{t}/hfnoweights"], "safetensors"),
    (["sample", "{t}/emptycfg"], "does not set model.vocab_size"),
    (["export", "{t}/emptycfg", "--out", "{t}/hf"], "does not set model.vocab_size"),
    (["sample", "{run}", "--max-new-tokens", "100000"], "exceed the model's context"),
    (["export", "{t}/empty", "--out", "{t}/hf"], "is not a depthlab run"),
    # never replace what was not asked for
    (["export", "{run}", "--out", "{run}"], "exists and is not empty"),
    (["export", "{run}", "--out", "{run}", "--overwrite"], "refusing to replace"),
    (["export", "{run}", "--out", "{t}/hf", "--analysis", "{t}/listresults"], "not a depthlab results file"),
    (["export", "{run}", "--out", "{t}/hf", "--analysis", "{t}/bad.jsonl"], "Not a directory"),
    (["export", "{run}", "--out", "{t}", "--overwrite"], "refusing to replace"),
    (["export", "{run}", "--out", "{run}/checkpoints", "--overwrite"], "refusing to replace"),
    (["export", "{run}", "--out", "{t}/baddata"], "exists and is not empty"),
    (["prune", "{run}", "--drop", "1", "--out", "{t}/baddata"], "exists and is not empty"),
    (["prune", "{run}", "--drop", "1", "--out", "{run}", "--overwrite"], "refusing to replace"),
    # analysis: metric names, options, numeric ranges, devices, a foreign results.json
    (["analyze", "{run}", "--metrics", "nope", "--out", "{t}/a"], "unknown metric 'nope'"),
    (["analyze", "{run}", "--option", "bad", "--out", "{t}/a"], "METRIC.KEY=VALUE"),
    (["analyze", "{run}", "--option", "nometric.x=1", "--out", "{t}/a"], "unknown metric 'nometric'"),
    (["analyze", "{run}", "--option", "variance.nope=1", "--out", "{t}/a"], "no option 'nope'"),
    (["analyze", "{run}", "--option", "variance.micro_batch_size=0", "--out", "{t}/a"], "must be positive"),
    (["analyze", "{run}", "--num-samples", "0", "--out", "{t}/a"], "must be positive"),
    (["analyze", "{run}", "--seq-len", "-1", "--out", "{t}/a"], "argument --seq-len: must be >= 2"),
    (["analyze", "{run}", "--seq-len", "64", "--out", "{t}/a"], "exceeds the model's context"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/missing.txt", "--out", "{t}/a"], "does not exist"),
    (["analyze", "{t}/missing", "--out", "{t}/a"], "no such model"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/empty.txt", "--out", "{t}/a"], "is empty"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/empty.jsonl", "--out", "{t}/a"], "is empty"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/empty.parquet", "--out", "{t}/a"], "is empty"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/inttext.parquet", "--out", "{t}/a"], "not text"),
    (["data", "prepare", "--source", "{t}/inttext.parquet", "--out", "{t}/p"], "not text"),
    (["analyze", "{run}", "--seq-len", "16", "--out", "{t}/listresults"], "not a depthlab results file"),
    (["analyze", "{run}", "--device", "cuda", "--out", "{t}/a"], "CUDA is not available"),
    (["analyze", "{run}", "--device", "bogus", "--out", "{t}/a"], "bogus"),
    (["analyze", "{run}", "--dtype", "fp8"], "invalid choice"),
    (["analyze", "{run}", "--cache-budget", "1e400", "--out", "{t}/a"], "not a finite size"),
    (["analyze", "hf-internal-testing/does-not-exist", "--out", "{t}/a"], "HF_HUB_OFFLINE"),
    # evaluation: task names, numeric ranges
    (["eval", "{run}", "--tasks", "nope"], "unknown task(s) nope"),
    (["eval", "{run}", "--tasks", "piqa,nope"], "unknown task(s) nope"),
    (["eval", "{run}", "--tasks", "piqa", "--log-samples"], "give --out"),
    (["eval", "{run}", "--ppl-data", "{t}/missing"], "not found"),
    (["eval", "{run}", "--tasks", "copa", "--device", "cuda"], "CUDA is not available"),
    (["eval", "{run}", "--tasks", ""], "no tasks given"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--ppl-data", ""], "--ppl-data is empty"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--json", ""], "--json is empty"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--json", "{t}/afile/x.json"], "is a file"),
    (["eval", "{run}", "--tasks", "piqa", "--num-fewshot", "100000", "--limit", "2"], "at most"),
    (["eval", "{run}", "--ppl-data", "shakespeare", "--ppl-context", "100000"], "context_length must be in"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--device", ""], "unknown device ''"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--backend", "nope"], "invalid choice"),
    (["sample", "{run}", "--device", ""], "unknown device ''"),
    (["sample", "{run}", "--json", ""], "--json is empty"),
    (["eval", "{t}/missing", "--tasks", "piqa"], "no such model"),
    # study specs: structure and the type of every field
    (["study", "run", "nope", "--out", "{t}/s"], "unknown study 'nope'"),
    (["study", "run", "{t}/spec_badkey.yaml", "--out", "{t}/s"], "unknown spec key"),
    (["study", "run", "{t}/spec_badgrid.yaml", "--out", "{t}/s"], "not config keys"),
    (["study", "run", "{t}/spec_badmetric.yaml", "--out", "{t}/s"], "unknown metric 'nope'"),
    (["study", "run", "{t}/spec_badtask.yaml", "--out", "{t}/s"], "unknown task(s) nope"),
    (["study", "run", "{t}/spec_notmap.yaml", "--out", "{t}/s"], "expected a mapping"),
    (["study", "run", "{t}/spec_badval.yaml", "--out", "{t}/s"], "must be positive"),
    (["study", "run", "{t}/spec_seeds.yaml", "--out", "{t}/s"], "'seeds'"),
    (["study", "run", "{t}/spec_hugeseed.yaml", "--out", "{t}/s"], "seed"),
    (["study", "run", "{t}/spec_both.yaml", "--out", "{t}/s"], "exactly one of"),
    (["study", "run", "{t}/spec_limit.yaml", "--out", "{t}/s"], "eval_limit"),
    (["study", "run", "{t}/spec_base_int.yaml", "--out", "{t}/s"], "base"),
    (["study", "run", "{t}/spec_measure_int.yaml", "--out", "{t}/s"], "measure"),
    (["study", "run", "{t}/spec_measure_list.yaml", "--out", "{t}/s"], "measure"),
    (["study", "run", "{t}/spec_reference_list.yaml", "--out", "{t}/s"], "reference"),
    (["study", "run", "{t}/spec_options_list.yaml", "--out", "{t}/s"], "analysis_options"),
    (["study", "run", "{t}/bad.yaml", "--out", "{t}/s"], "malformed YAML"),
    (["study", "run", "depth", "--jobs", "0", "--out", "{t}/s"], "--jobs"),
    (["study", "run", "depth", "--scale", "nope", "--out", "{t}/s"], "no scale 'nope'"),
    (["study", "run", "depth", "--only", "nope", "--out", "{t}/s"], "no run named 'nope'"),
    (["study", "run", "{t}/spec_ok.yaml", "--model.n_layers=0", "--out", "{t}/s"], "model.n_layers"),
    (["study", "status", "{t}/missing"], "not a study folder"),
    (["study", "show", "{t}/spec_badmetric.yaml"], "unknown metric"),
    (["report", "{t}/empty"], "not a study folder"),
    (["compare", "{t}/missing", "{run}"], "no such model"),
    (["compare", "{run}", "{t}/empty"], "neither a depthlab run"),
    # theory and recipe ranges
    (["theory", "--densities", "0", "--out", "{t}/th"], "densities must be in (0, 1]"),
    (["theory", "--densities", "2", "--out", "{t}/th"], "densities must be in (0, 1]"),
    (["theory", "--densities", "abc", "--out", "{t}/th"], "comma-separated numbers"),
    (["theory", "--densities", ",", "--out", "{t}/th"], "--densities is empty"),
    (["theory", "--layers", "0", "--out", "{t}/th"], "layers must be in"),
    (["theory", "--sigma-w", "inf", "--out", "{t}/th"], "must be finite"),
    (["theory", "--support", "nan", "--out", "{t}/th"], "must be finite"),
    (["theory", "--densities", "0.5,nan", "--out", "{t}/th"], "densities must be in (0, 1]"),
    (["theory", "--d-model", "-1", "--out", "{t}/th"], "d_model must be in"),
    (["theory", "--seeds", "0", "--out", "{t}/th"], "seeds must be in"),
    (["theory", "--tokens", "0", "--out", "{t}/th"], "tokens must be in"),
    (["recipe", "--layers", "0", "--active-params", "1B"], "layers must be"),
    (["recipe", "--layers", "12", "--active-params", "abc"], "expected a number"),
    (["recipe", "--layers", "12", "--active-params", "100M", "--budget-tokens", "xyz"], "expected a number"),
    (["nonsense-command"], "invalid choice"),
]

SPECS = {
    "spec_ok.yaml": "name: s\nbase: tiny\ngrid: {model.n_layers: [2]}\n",
    "spec_hugeseed.yaml": f"name: s\ngrid: {{model.n_layers: [2]}}\nseeds: [{2**70}]\n",
    "spec_base_int.yaml": "name: s\nbase: 3\ngrid: {model.n_layers: [2]}\n",
    "spec_measure_int.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: 3\n",
    "spec_measure_list.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: [variance]\n",
    "spec_reference_list.yaml": "name: s\nreference: [depth]\ngrid: {model.n_layers: [2]}\n",
    "spec_options_list.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: {analysis_options: [1]}\n",
    "dup.yaml": "model:\n  n_layers: 2\n  n_layers: 3\n",
}


@pytest.fixture(scope="module")
def ws(workspace, read_only):
    for name, text in SPECS.items():
        (workspace / name).write_text(text)
    return workspace, read_only


@pytest.fixture(autouse=True)
def _no_real_work(monkeypatch):
    """A case that gets past validation must fail fast, not train a model, launch a study or run the demo."""
    import depthlab.study.runner
    import depthlab.tools.demo
    import depthlab.train.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached real work")

    monkeypatch.setattr(depthlab.train.trainer, "Transformer", refuse)
    monkeypatch.setattr(depthlab.study.runner, "_run_pool", refuse)
    monkeypatch.setattr(depthlab.tools.demo, "run_demo", refuse)


def _fill(items: list[str], ws, dataset: Path) -> list[str]:
    workspace, read_only = ws
    if any("{ro}" in item for item in items) and read_only is None:
        pytest.skip("no read-only mount on this machine (needs root)")
    names = {"{t}": str(workspace), "{run}": str(workspace / "run"), "{data}": str(dataset),
             "{corpus}": str(Path(dataset).parent / "corpus"), "{ro}": str(read_only)}
    for key, value in names.items():
        items = [item.replace(key, value) for item in items]
    return items


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (unknown choices, missing arguments)
        return e.code


def check_refused(argv: list[str], message: str, ws, dataset, capsys) -> None:
    argv, message = _fill(argv, ws, dataset), _fill([message], ws, dataset)[0]
    before = snapshot(ws[0])
    code = _exit_code(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}: {err}"
    assert err and err.count("\n") <= 1 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(ws[0]) == before, "a rejected command changed the workspace"


N_CASES = (len(CONFIG_CASES) * len(CONFIG_COMMANDS) + len(OPTION_CASES) + len(NUMERIC_CASES) + len(OUT_CASES)
           + len(FILE_OUT_CASES) + len(MODEL_CASES) + len(CASES))
"""The size of the matrix (docs/reliability.md states it)."""


def test_matrix_covers_every_subcommand_and_config_key():
    from depthlab.cli import COMMANDS

    exercised = {argv[0] for argv, _ in CASES} | {c.split()[0] for c in [*WRITERS, *READERS, *CONFIG_COMMANDS]}
    assert {name for name, _ in COMMANDS} <= exercised | {"recipe"}
    assert {key for key, _ in CONFIG_CASES} == set(cfgmod.all_keys())
    for name in ("eval", "sample", "analyze", "compare", "doctor", "prune", "study run", "study smoke"):
        # every numeric option of these declares its range (a Number, not a bare int)
        bare = [max(a.option_strings, key=len) for a in _subcommands()[name]._actions if a.type in (int, float)]
        assert not bare, f"{name}: {bare} have no declared range"
    assert N_CASES >= 1500, N_CASES


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("key, value", CONFIG_CASES, ids=[f"{k}={v[:12]}" for k, v in CONFIG_CASES])
def test_config_key_boundary_values(command, key, value, ws, tiny_dataset, capsys):
    check_refused([*CONFIG_COMMANDS[command], f"--{key}={value}"], key, ws, tiny_dataset, capsys)


@pytest.mark.parametrize("option, value", OPTION_CASES, ids=[f"{o}={v[:10]}" for o, v in OPTION_CASES])
def test_analysis_option_types(option, value, ws, tiny_dataset, capsys):
    check_refused(["analyze", "{run}", "--option", f"{option}={value}", "--out", "{t}/a"], f"option {option}",
                  ws, tiny_dataset, capsys)


@pytest.mark.parametrize("command, flag, value", NUMERIC_CASES, ids=[f"{c} {f}={v[:12]}" for c, f, v in NUMERIC_CASES])
def test_numeric_option_boundary_values(command, flag, value, ws, tiny_dataset, capsys):
    check_refused([*command.split(), *_positionals(command), f"{flag}={value}"], f"argument {flag}", ws,
                  tiny_dataset, capsys)


@pytest.mark.parametrize("command, out, message", OUT_CASES, ids=[f"{c} {o[:20]}" for c, o, _ in OUT_CASES])
def test_unusable_out_folder(command, out, message, ws, tiny_dataset, capsys):
    check_refused([*WRITERS[command], "--out", out], message, ws, tiny_dataset, capsys)


@pytest.mark.parametrize("out, message", FILE_OUT_CASES, ids=[o[:20] for o, _ in FILE_OUT_CASES])
def test_unusable_out_file(out, message, ws, tiny_dataset, capsys):
    check_refused(["recipe", "--layers", "12", "--active-params", "100M", "--out", out], message, ws, tiny_dataset,
                  capsys)


@pytest.mark.parametrize("command, model, message", MODEL_CASES, ids=[f"{c} {m[4:]}" for c, m, _ in MODEL_CASES])
def test_damaged_model_files(command, model, message, ws, tiny_dataset, capsys):
    check_refused([a.replace("{m}", model) for a in READERS[command]], message, ws, tiny_dataset, capsys)


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, ws, tiny_dataset, capsys):
    check_refused(argv, message, ws, tiny_dataset, capsys)


@pytest.mark.parametrize("argv, message", [
    (["train", "{t}/cfg.yaml", "--out", "{t}/afile"], "is a file"),
    (["analyze", "{run}", "--device", "bogus", "--out", "{t}/a"], "bogus"),
])
@pytest.mark.slow  # a fresh interpreter imports torch: ~5 s each on an idle 2-core machine
def test_bad_input_through_a_real_process(argv, message, ws, tiny_dataset):
    before = snapshot(ws[0])
    proc = subprocess.run([sys.executable, "-m", "depthlab", *_fill(argv, ws, tiny_dataset)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(ws[0]) == before
