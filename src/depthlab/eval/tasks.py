"""Zero-shot multiple-choice tasks: bundled data and prompt formats.

Every task turns one JSON document into one ``Example``: a (context, continuation) request per answer choice, the
index of the correct choice, and the string lengths that ``acc_norm`` divides by. The strings follow
lm-evaluation-harness's task definitions (``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` and the default
target delimiter ``" "``) character for character, so the numbers are comparable with lm-eval's; the cross-check
against lm-eval itself lives in ``depthlab.eval.lmeval`` and in the tests.

The data are the validation splits shipped in ``depthlab/eval/data`` (see its README for sources and licences), so an
installed depthlab evaluates offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from depthlab.errors import EvalError

DELIMITER = " "  # lm-eval's default target_delimiter, placed between context and each choice


@dataclass(frozen=True)
class Example:
    """One scored document: ``requests[i]`` is the (context, continuation) pair of choice ``i``.

    ``norm_lengths[i]`` is what lm-eval's ``acc_norm`` divides choice ``i``'s log-likelihood by: the length in
    characters of the choice string (the continuation without the target delimiter).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]


def _choices_after(context: str, choices: list[str], gold: int) -> Example:
    """The common layout: one shared context, each choice scored as ``" " + choice`` after it."""
    return Example(tuple((context, DELIMITER + c) for c in choices), gold, tuple(len(c) for c in choices))


def _arc(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return _choices_after(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                          labels.index(doc["answerKey"]))


def _piqa(doc: dict) -> Example:
    return _choices_after(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _sciq(doc: dict) -> Example:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices_after(context, choices, 3)


def _openbookqa(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return _choices_after(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


def _boolq(doc: dict) -> Example:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _choices_after(context, ["no", "yes"], int(bool(doc["answer"])))


def _copa(doc: dict) -> Example:
    # lm-eval drops the premise's final period, joins with a connector, and lower-cases the choice's first letter.
    # Its choices already start with a space and the default delimiter adds another: the continuation begins with
    # two spaces. We reproduce that so the numbers match.
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    context = doc["premise"].strip()[:-1] + f" {connector}"
    choices = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return _choices_after(context, choices, int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    # Partial scoring: each option fills the blank in its own context, and the shared rest of the sentence is the
    # continuation, so the options are compared on the same tokens. Its acc_norm equals acc (same continuation).
    sentence = doc["sentence"]
    blank = sentence.index("_")
    continuation = DELIMITER + sentence[blank + 1:].strip()
    contexts = [sentence[:blank] + option for option in (doc["option1"], doc["option2"])]
    return Example(tuple((c, continuation) for c in contexts), {"1": 0, "2": 1}[doc["answer"]],
                   (len(continuation) - len(DELIMITER),) * 2)


def _lettered(prefix: str, question: str, texts: list[str]) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts))
    return f"{prefix}{question}{options}\nAnswer:"


def _commonsense_qa(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    context = _lettered("Question: ", doc["question"].strip(), doc["choices"]["text"])
    return _choices_after(context, labels, labels.index(doc["answerKey"]))


def _social_iqa(doc: dict) -> Example:
    context = f"Q: {doc['context']} {doc['question']}\nA:"
    return _choices_after(context, [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)


def _mmlu(doc: dict) -> Example:
    subject = doc["subject"].replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return _choices_after(_lettered(header, doc["question"].strip(), doc["choices"]), ["A", "B", "C", "D"],
                          int(doc["answer"]))


def _rte(doc: dict) -> Example:
    context = f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:"
    return _choices_after(context, ["True", "False"], int(doc["label"]))


def _cb(doc: dict) -> Example:
    context = f"{doc['premise']}\nQuestion: {doc['hypothesis']}. True, False, or Neither?\nAnswer:"
    return _choices_after(context, ["True", "False", "Neither"], int(doc["label"]))


def _mrpc(doc: dict) -> Example:
    context = (f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\n"
               "Question: Do both sentences mean the same thing?\nAnswer:")
    return _choices_after(context, ["no", "yes"], int(doc["label"]))


def _sst2(doc: dict) -> Example:
    context = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _choices_after(context, ["negative", "positive"], int(doc["label"]))


@dataclass(frozen=True)
class Task:
    """A bundled task: its data file (in ``depthlab/eval/data``) and its document-to-example function."""

    name: str
    filename: str
    build: Callable[[dict], Example]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "arc_easy.jsonl", _arc),
    Task("arc_challenge", "arc_challenge.jsonl", _arc),
    Task("piqa", "piqa.jsonl", _piqa),
    Task("sciq", "sciq.jsonl", _sciq),
    Task("winogrande", "winogrande.jsonl", _winogrande),
    Task("openbookqa", "openbookqa.jsonl", _openbookqa),
    Task("boolq", "boolq.jsonl", _boolq),
    Task("copa", "copa.jsonl", _copa),
    Task("commonsense_qa", "commonsense_qa.jsonl", _commonsense_qa),
    Task("social_iqa", "social_iqa.jsonl", _social_iqa),
    Task("mmlu", "mmlu_validation.jsonl", _mmlu),
    Task("rte", "rte.jsonl", _rte),
    Task("cb", "cb.jsonl", _cb),
    Task("mrpc", "mrpc.jsonl", _mrpc),
    Task("sst2", "sst2.jsonl", _sst2),
]}


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """Task names from ``"all"``, a comma-separated string or a list; unknown names list the valid ones."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    if not names:
        raise EvalError(f"no tasks given; choose 'all' or some of: {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}, or 'all'")
    return list(dict.fromkeys(names))


def data_path(task: str) -> Path:
    """Where the bundled jsonl file of ``task`` lives."""
    return Path(str(resources.files("depthlab.eval").joinpath("data", TASKS[task].filename)))


def load_examples(task: str, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples of ``task`` (all when ``limit`` is None), in file order.

    A line that is not JSON, or lacks a field the prompt needs, raises EvalError naming the file and the line.
    """
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be a positive number of examples, got {limit}")
    path = data_path(task)
    build = TASKS[task].build
    examples: list[Example] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise EvalError(f"cannot read task file {path}: {e.strerror or e}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                example = build(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise EvalError(f"{path}:{lineno}: malformed {task} document ({type(e).__name__}: {e})") from None
            if not 0 <= example.gold < len(example.requests):
                raise EvalError(f"{path}:{lineno}: answer index {example.gold} out of range for "
                                f"{len(example.requests)} choices")
            examples.append(example)
    if not examples:
        raise EvalError(f"task file {path} has no examples")
    return examples
