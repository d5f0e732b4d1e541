"""`depthlab eval` end to end on a tiny Hugging Face folder; bad inputs give one line and exit code 2."""

import json

import pytest

from depthlab.cli import main
from depthlab.eval import tasks as tasks_mod
from tests.eval.conftest import tiny_llama, tokenizer  # noqa: F401 — tokenizer is a fixture


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):  # noqa: F811 — the imported fixture
    root = tmp_path_factory.mktemp("models")
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    model.save_pretrained(root / "no_tokenizer")
    return root


def run_cli(capsys, *argv):
    try:
        code = main(["eval", *map(str, argv)])
    except SystemExit as e:  # argparse refuses an option's value (e.g. --limit 0) while parsing
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line (transformers' loading progress bars may come before it)."""
    line = err.strip().splitlines()[-1]
    assert line.startswith("depthlab eval: error: ")
    return line


def test_eval_writes_results_and_samples(model_dirs, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("The whale breathes air. " * 20)
    code, out, err = run_cli(capsys, model_dirs / "tiny", "--tasks", "copa,arc_easy", "--limit", 3, "--ppl-data",
                             text, "--out", tmp_path / "res", "--log-samples", "--batch-size", 4)
    assert code == 0, err
    assert "copa" in out and "average" in out and "perplexity" in out
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(results["results"]) == {"copa", "arc_easy", "average"} and results["n-shot"]["copa"] == 0
    assert results["perplexity"]["tokens"] > 0 and results["config"]["model"] == str(model_dirs / "tiny")
    assert len((tmp_path / "res" / "samples_arc_easy.jsonl").read_text().splitlines()) == 3


def test_few_shot_and_generative_from_the_cli(model_dirs, tmp_path, capsys):
    code, out, err = run_cli(capsys, model_dirs / "tiny", "--tasks", "mmlu,basic_arithmetic", "--limit", 2,
                             "--num-fewshot", 2, "--out", tmp_path, "--quiet")
    assert code == 0, err
    header, *rows = out.splitlines()[:4]
    assert header.split()[:6] == ["task", "split", "shots", "n", "acc", "(%)"] and "exact_match" in header
    assert rows[0].split()[:4] == ["mmlu", "validation", "2", "2"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["configs"]["mmlu"]["num_fewshot"] == 2 and "exact_match,remove_whitespace" in \
        results["results"]["basic_arithmetic"]


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "piqa,hellaswag"], "unknown task(s) hellaswag; valid tasks: arc_easy"),
    (["--tasks", "piqa", "--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0, got -1"),
    (["--tasks", "copa,mmlu", "--num-fewshot", "6"], "mmlu allows at most 5 few-shot examples (its dev split"),
    (["--tasks", "cb", "--num-fewshot", "56"], "cb allows at most 55 few-shot examples"),
    (["--tasks", "piqa", "--limit", "0"], "argument --limit: must be positive, got 0"),
    (["--tasks", "piqa", "--log-samples"], "--log-samples writes files: give --out DIR"),
])
def test_bad_arguments(model_dirs, capsys, tmp_path, argv, message):
    out = [] if "--log-samples" in argv else ["--out", tmp_path / "res"]
    code, _out, err = run_cli(capsys, model_dirs / "tiny", *argv, *out)
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "res").exists()  # nothing written


def test_model_without_tokenizer(model_dirs, capsys):
    code, _out, err = run_cli(capsys, model_dirs / "no_tokenizer", "--tasks", "copa", "--limit", 1)
    assert code == 2 and "tokenizer" in error_line(err)


def test_malformed_task_file(model_dirs, capsys, monkeypatch, tmp_path):
    bad = tmp_path / "copa.jsonl"
    bad.write_text('{"premise": "It rained.", "choice1": "a", "choice2": "b", "question": "effect", "label": 0}\n'
                   '{"premise": "It rained."}\n')
    monkeypatch.setattr(tasks_mod, "data_path", lambda task: bad)
    code, _out, err = run_cli(capsys, model_dirs / "tiny", "--tasks", "copa")
    assert code == 2 and f"{bad}:2: malformed copa document" in error_line(err)
