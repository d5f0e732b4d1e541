"""Bad-input matrix: every malformed input to every subcommand is one line on stderr, exit code 2, no traceback, and
leaves every file as it was.

Each case runs in-process through `depthlab.cli.main` (fast); a few run through `python -m depthlab` to check the real
process boundary. Placeholders: {t} the workspace folder, {run} a trained tiny run in it, {data} a prepared dataset,
{corpus} that dataset's text corpus.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from depthlab.cli import main
from tests.reliability.conftest import snapshot

TRAIN = ["train", "{t}/cfg.yaml", "--out", "{t}/new"]
CASES = [
    # config files
    (["train", "{t}/bad.yaml", "--out", "{t}/new"], "malformed YAML"),
    (["train", "{t}/list.yaml", "--out", "{t}/new"], "expected a mapping"),
    (["train", "{t}/type.yaml", "--out", "{t}/new"], "model.n_layers: expected int"),
    (["train", "{t}/binary.yaml", "--out", "{t}/new"], "cannot read config file"),
    (["train", "{t}/empty", "--out", "{t}/new"], "cannot read config file"),
    (["train", "{t}/missing.yaml", "--out", "{t}/new"], "config file not found"),
    (["train", "{t}/cfg.yaml", "--preset", "tiny", "--out", "{t}/new"], "not both"),
    (["config", "nope"], "unknown preset 'nope'"),
    # overrides and numeric ranges
    ([*TRAIN, "--model.n_layers"], "has no value"),
    ([*TRAIN, "--model.n_layers=abc"], "expected int"),
    ([*TRAIN, "--model.n_layers=0"], "must be positive"),
    ([*TRAIN, "--model.n_layers=-2"], "must be positive"),
    ([*TRAIN, "--model.d_model=1e400"], "expected int"),
    ([*TRAIN, "--model.seq_len=0"], "must be positive"),
    ([*TRAIN, "--model.n_heads=3"], "divisible by model.n_heads"),
    ([*TRAIN, "--model.moe.top_k=5", "--model.moe.num_experts=4"], "top_k"),
    ([*TRAIN, "--model.vocab_size=10"], "smaller than the dataset"),
    ([*TRAIN, "--trainer.max_steps=0"], "must be positive"),
    ([*TRAIN, "--trainer.batch_size=0"], "must be positive"),
    ([*TRAIN, "--trainer.micro_batch_size=3"], "divisible"),
    ([*TRAIN, "--trainer.dtype=fp8"], "trainer.dtype"),
    ([*TRAIN, "--trainer.device=cuda"], "CUDA is not available"),
    ([*TRAIN, "--optimizer.lr=nan"], "optimizer.lr"),
    ([*TRAIN, "--optimizer.lr=-1"], "must be positive"),
    ([*TRAIN, "--optimizer.weight_decay=-1"], "must be >= 0"),
    ([*TRAIN, "--schedule.warmup_steps=-5"], "must be >= 0"),
    ([*TRAIN, "--foo.bar=1"], "unknown config key"),
    ([*TRAIN, "--model.n_layer=3"], "did you mean"),
    (["config", "--model.n_layers=x"], "expected int"),
    # run folders and data paths
    (["train", "{t}/cfg.yaml", "--out", "{t}/afile"], "is a file"),
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
    (["data", "prepare", "--source", "{corpus}", "--val-fraction", "1.5", "--out", "{t}/p"], "val_fraction"),
    (["data", "prepare", "--source", "{corpus}", "--val-fraction", "-0.1", "--out", "{t}/p"], "val_fraction"),
    (["data", "prepare", "--source", "{corpus}", "--tokenizer", "{t}/missing.json", "--out", "{t}/p"],
     "does not exist"),
    (["data", "prepare", "--source", "{corpus}", "--vocab-size", "260", "--out", "{data}"], "different dataset"),
    (["data", "info", "{t}/missing"], "does not exist"),
    (["data", "info", "{t}/baddata"], "corrupt"),
    # model paths
    (["sample", "{t}/missing"], "no such model"),
    (["sample", "{t}/empty"], "neither a depthlab run"),
    (["sample", "{t}/hfbad"], "not a valid JSON"),
    (["sample", "{t}/hfnoweights"], "safetensors"),
    (["sample", "{run}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sample", "{run}", "--temperature", "-1"], "--temperature"),
    (["export", "{t}/empty", "--out", "{t}/hf"], "is not a depthlab run"),
    # analysis: metric names, options, numeric ranges, devices
    (["analyze", "{run}", "--metrics", "nope", "--out", "{t}/a"], "unknown metric 'nope'"),
    (["analyze", "{run}", "--option", "bad", "--out", "{t}/a"], "METRIC.KEY=VALUE"),
    (["analyze", "{run}", "--option", "nometric.x=1", "--out", "{t}/a"], "unknown metric 'nometric'"),
    (["analyze", "{run}", "--option", "variance.nope=1", "--out", "{t}/a"], "no option 'nope'"),
    (["analyze", "{run}", "--num-samples", "0", "--out", "{t}/a"], "must be positive"),
    (["analyze", "{run}", "--seq-len", "-1", "--out", "{t}/a"], "must be positive"),
    (["analyze", "{run}", "--seq-len", "64", "--out", "{t}/a"], "exceeds the model's context"),
    (["analyze", "{run}", "--seq-len", "16", "--data", "{t}/missing.txt", "--out", "{t}/a"], "does not exist"),
    (["analyze", "{t}/missing", "--out", "{t}/a"], "no such model"),
    (["analyze", "{run}", "--device", "cuda", "--out", "{t}/a"], "CUDA is not available"),
    (["analyze", "{run}", "--device", "bogus", "--out", "{t}/a"], "unknown device 'bogus'"),
    (["analyze", "{run}", "--dtype", "fp8"], "invalid choice"),
    # evaluation: task names, numeric ranges
    (["eval", "{run}", "--tasks", "nope"], "unknown task(s) nope"),
    (["eval", "{run}", "--tasks", "piqa,nope"], "unknown task(s) nope"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "0"], "--limit"),
    (["eval", "{run}", "--tasks", "piqa", "--log-samples"], "give --out"),
    (["eval", "{run}", "--ppl-data", "{t}/missing"], "not found"),
    (["eval", "{run}", "--ppl-data", "shakespeare", "--ppl-context", "0"], "--ppl-context"),
    (["eval", "{run}", "--ppl-data", "shakespeare", "--ppl-stride", "-1"], "--ppl-stride"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--batch-size", "0"], "batch_size"),
    (["eval", "{run}", "--tasks", "piqa", "--limit", "2", "--max-batch-tokens", "0"], "max_tokens"),
    (["eval", "{run}", "--tasks", "copa", "--device", "cuda"], "CUDA is not available"),
    (["eval", "{t}/missing", "--tasks", "piqa"], "no such model"),
    # study specs
    (["study", "run", "nope", "--out", "{t}/s"], "unknown study 'nope'"),
    (["study", "run", "{t}/spec_badkey.yaml", "--out", "{t}/s"], "unknown spec key"),
    (["study", "run", "{t}/spec_badgrid.yaml", "--out", "{t}/s"], "not config keys"),
    (["study", "run", "{t}/spec_badmetric.yaml", "--out", "{t}/s"], "unknown metric 'nope'"),
    (["study", "run", "{t}/spec_badtask.yaml", "--out", "{t}/s"], "unknown task(s) nope"),
    (["study", "run", "{t}/spec_notmap.yaml", "--out", "{t}/s"], "expected a mapping"),
    (["study", "run", "{t}/spec_badval.yaml", "--out", "{t}/s"], "must be positive"),
    (["study", "run", "{t}/spec_seeds.yaml", "--out", "{t}/s"], "'seeds'"),
    (["study", "run", "{t}/spec_both.yaml", "--out", "{t}/s"], "exactly one of"),
    (["study", "run", "{t}/spec_limit.yaml", "--out", "{t}/s"], "eval_limit"),
    (["study", "run", "{t}/bad.yaml", "--out", "{t}/s"], "malformed YAML"),
    (["study", "run", "depth", "--jobs", "0", "--out", "{t}/s"], "--jobs"),
    (["study", "run", "depth", "--scale", "nope", "--out", "{t}/s"], "no scale 'nope'"),
    (["study", "run", "depth", "--only", "nope", "--out", "{t}/s"], "no run named 'nope'"),
    (["study", "status", "{t}/missing"], "not a study folder"),
    (["study", "show", "{t}/spec_badmetric.yaml"], "unknown metric"),
    (["report", "{t}/empty"], "not a study folder"),
    (["compare", "{t}/missing", "{run}"], "not a run folder"),
    (["compare", "{run}", "{t}/empty"], "not a run folder"),
    # theory and recipe ranges
    (["theory", "--densities", "0", "--out", "{t}/th"], "densities must be in (0, 1]"),
    (["theory", "--densities", "2", "--out", "{t}/th"], "densities must be in (0, 1]"),
    (["theory", "--densities", "abc", "--out", "{t}/th"], "comma-separated numbers"),
    (["theory", "--densities", ",", "--out", "{t}/th"], "--densities is empty"),
    (["theory", "--layers", "0", "--out", "{t}/th"], "layers must be in"),
    (["theory", "--d-model", "-1", "--out", "{t}/th"], "d_model must be in"),
    (["theory", "--seeds", "0", "--out", "{t}/th"], "seeds must be in"),
    (["theory", "--tokens", "0", "--out", "{t}/th"], "tokens must be in"),
    (["recipe", "--layers", "0", "--active-params", "1B"], "layers must be"),
    (["recipe", "--layers", "12", "--active-params", "abc"], "expected a number"),
    (["recipe", "--layers", "12", "--active-params", "100M", "--budget-tokens", "xyz"], "expected a number"),
    (["recipe", "--layers", "12", "--active-params", "100M", "--out", "{t}/afile/x.yaml"], "cannot write"),
    (["nonsense-command"], "invalid choice"),
]


def _fill(items: list[str], workspace: Path, dataset: Path) -> list[str]:
    names = {"{t}": str(workspace), "{run}": str(workspace / "run"), "{data}": str(dataset),
             "{corpus}": str(Path(dataset).parent / "corpus")}
    for key, value in names.items():
        items = [item.replace(key, value) for item in items]
    return items


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (unknown choices, missing arguments)
        return e.code


def test_matrix_is_large_and_covers_every_subcommand():
    from depthlab.cli import COMMANDS

    assert len(CASES) >= 40
    exercised = {argv[0] for argv, _ in CASES}
    unfinished = {"demo", "doctor", "prune"}  # demo takes no malformed input beyond overrides; others not landed
    assert {name for name, _ in COMMANDS} - unfinished <= exercised


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, workspace, tiny_dataset, capsys):
    argv = _fill(argv, workspace, tiny_dataset)
    before = snapshot(workspace)
    code = _exit_code(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}: {err}"
    assert err and "\n" not in err and "Traceback" not in err, err
    assert _fill([message], workspace, tiny_dataset)[0] in err
    assert snapshot(workspace) == before, "a rejected command changed the workspace"


@pytest.mark.parametrize("argv, message", [
    (["train", "{t}/cfg.yaml", "--out", "{t}/afile"], "is a file"),
    (["analyze", "{run}", "--device", "bogus", "--out", "{t}/a"], "unknown device"),
])
@pytest.mark.slow  # a fresh interpreter imports torch: ~5 s each on an idle 2-core machine
def test_bad_input_through_a_real_process(argv, message, workspace, tiny_dataset):
    before = snapshot(workspace)
    proc = subprocess.run([sys.executable, "-m", "depthlab", *_fill(argv, workspace, tiny_dataset)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(workspace) == before
