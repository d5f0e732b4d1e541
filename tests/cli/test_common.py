"""One CLI convention (depthlab.cli.common): the same MODEL/--device/--dtype/--json/--quiet everywhere, overrides with
a space, no torch to build the parser, shell completion, one-line errors for a device or dtype this machine lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from depthlab.cli import build_parser, main
from depthlab.cli.common import MODEL_HELP, normalize_overrides
from depthlab.precision import DTYPE_NAMES

MODEL_COMMANDS = ("analyze", "eval", "doctor", "prune", "sample")


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command").choices


def _option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_model_device_dtype_spelled_once(name):
    p = _subparsers(build_parser())[name]
    model = next(a for a in p._actions if a.dest == "model")
    assert model.metavar == "MODEL" and model.help == MODEL_HELP
    assert _option(p, "--device").default == "auto"
    dtype = _option(p, "--dtype")
    assert dtype.default == "auto" and tuple(dtype.choices) == DTYPE_NAMES
    if name != "eval":  # eval draws nothing at random (zero-shot, greedy)
        assert _option(p, "--seed").default == 0
    if name != "sample":
        assert "--no-progress" in _option(p, "--quiet").option_strings


@pytest.mark.parametrize("name", ("analyze", "eval", "doctor", "prune", "compare", "sample"))
def test_json_flag_everywhere_results_are_printed(name):
    action = _option(_subparsers(build_parser())[name], "--json")
    assert action.const == "-" and action.nargs == "?"


def test_building_the_parser_imports_no_torch():
    code = ("import sys, depthlab.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "depthlab", "--version"], capture_output=True, text=True,
                             check=True, timeout=60)
    assert version.stdout.startswith("depthlab ")


def test_shell_completion_lists_subcommands_and_choices():
    pytest.importorskip("argcomplete")
    line = "depthlab analyze smollm2 --dtype "

    def complete(line):  # what bash's completion hook does: argcomplete answers on fd 8
        env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
               "COMP_POINT": str(len(line))}
        proc = subprocess.run(f"'{sys.executable}' -m depthlab 8>&1 9>/dev/null", shell=True, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return [word.strip() for word in proc.stdout.split("\n") if word.strip()]

    assert complete(line) == list(DTYPE_NAMES)
    assert "analyze" in complete("depthlab an")


def test_override_value_after_a_space():
    assert normalize_overrides(["--preset", "tiny", "--model.n_layers", "2", "--out", "r"]) == [
        "--preset", "tiny", "--model.n_layers=2", "--out", "r"]
    assert normalize_overrides(["--optimizer.lr", "-1", "--trainer.seed=3"]) == ["--optimizer.lr=-1",
                                                                              "--trainer.seed=3"]
    assert normalize_overrides(["--model.n_layers", "--out", "r"]) == ["--model.n_layers", "--out", "r"]
    assert normalize_overrides(["--option", "usefulness.tau=0.2"]) == ["--option", "usefulness.tau=0.2"]


def test_override_with_a_space_is_not_taken_for_the_config_file(tmp_path, capsys):
    # before: "2" became the positional config file ("config file not found: 2")
    assert main(["config", "tiny", "--model.n_layers", "3"]) == 0
    assert "n_layers: 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["analyze", "smollm2", "--dtype", "int8", "--out", "{t}/a"], "invalid choice: 'int8'"),
    (["eval", "smollm2", "--dtype", "int8", "--out", "{t}/e"], "invalid choice: 'int8'"),
    (["sample", "smollm2", "--device", "bogus"], "unknown device 'bogus'"),
    (["doctor", "smollm2", "--device", "cuda:0", "--json", "{t}/d.json"], "CUDA is not available"),
    (["prune", "smollm2", "--drop", "1", "--device", "cuda", "--out", "{t}/p"], "CUDA is not available"),
])
def test_device_or_dtype_this_machine_lacks_is_one_line_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert err.startswith(f"depthlab {argv[0]}: error: ")
    assert list(tmp_path.iterdir()) == []


def test_data_info_into_a_closed_pipe_is_quiet(tiny_dataset):
    # `true` exits without reading: the write meets a closed pipe, as `| head` does on long output
    proc = subprocess.run(f"'{sys.executable}' -m depthlab data info '{tiny_dataset}' | true; "
                          f"'{sys.executable}' -m depthlab data info '{tiny_dataset}' | head -n 1",
                          shell=True, capture_output=True, text=True, check=False, timeout=120)
    assert proc.stdout.startswith("dataset") and proc.stderr == "", proc.stderr


def test_data_info_json_is_the_meta(tiny_dataset, capsys):
    assert main(["data", "info", str(tiny_dataset), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["path"] == str(tiny_dataset) and meta["splits"]["train"]["tokens"] > 0
