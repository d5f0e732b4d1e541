"""Benchmark tasks: bundled data, lm-eval's prompt formats, few-shot contexts.

Every task turns one JSON document into a ``Doc``: its question text (``doc_to_text``), its answers
(``doc_to_choice`` / ``doc_to_target``) and an optional description placed before everything. The strings follow
lm-evaluation-harness's task definitions character for character, so the numbers are comparable with lm-eval's; the
cross-check against lm-eval itself lives in ``depthlab.eval.lmeval`` and in the tests.

A k-shot prompt is lm-eval's plain-text layout::

    description + Σ_shots (text + target_delimiter + answer + fewshot_delimiter) + text

and the model's continuation after it is ``target_delimiter + choice`` (multiple choice: every choice is scored) or is
generated greedily (generative tasks: ``nq_open``, ``basic_arithmetic``). The shots are chosen as lm-eval chooses
them: MMLU takes the first k dev questions of the same subject (its ``first_n`` sampler, one task per subject in
lm-eval); every other task draws, with ``random.Random(seed)`` (lm-eval's default few-shot seed 1234) seeded once
per task and advanced document by document, ``k + 1`` documents of the evaluated split, drops the document itself and
keeps ``k``. lm-eval would draw those from the train split, which is not bundled; the bridge runs lm-eval the same
way, so the two agree.

The data are the validation splits shipped in ``depthlab/eval/data`` (see its README for sources and licences), so an
installed depthlab evaluates offline. Several lm-eval tasks of the same name score a *test* split (ARC, OpenBookQA,
SciQ, MMLU); ``Task.lmeval_split`` records which, and the results name the split that was scored.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from depthlab.errors import EvalError

DELIMITER = " "  # lm-eval's default target_delimiter, placed between a question and its answer
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass(frozen=True)
class Doc:
    """One document in its task's prompt format.

    Multiple choice: choice ``i`` is scored as ``DELIMITER + answers[i]`` after ``contexts[0]``; when the choices
    differ in their context instead (Winogrande's partial scoring) ``contexts[i]`` is followed by the one shared
    ``answers[0]``. Generative: ``contexts[0]`` is the question and ``answers`` the accepted answers.
    """

    contexts: tuple[str, ...]
    answers: tuple[str, ...]
    gold: int = 0
    description: str = ""

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.answers))

    def answered(self) -> str:
        """The document as a shot: its question, the target delimiter and its gold answer (lm-eval's
        ``doc_to_text + target_delimiter + doc_to_target``)."""
        context = self.contexts[min(self.gold, len(self.contexts) - 1)]
        return context + DELIMITER + self.answers[min(self.gold, len(self.answers) - 1)]


@dataclass(frozen=True)
class Example:
    """One scored multiple-choice document: ``requests[i]`` is the (context, continuation) pair of choice ``i``.

    ``norm_lengths[i]`` is what lm-eval's ``acc_norm`` divides choice ``i``'s log-likelihood by: the length in
    characters of the choice string (the continuation without the target delimiter).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]


@dataclass(frozen=True)
class Question:
    """One generative document: the prompt to continue and the answers an exact match accepts."""

    context: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ExactMatch:
    """lm-eval's ``exact_match`` (Hugging Face evaluate's definition) with its normalisation options.

    The stripped prediction matches when it equals any accepted answer after both have the regexes removed, then
    (optionally) are lower-cased, then have ASCII punctuation removed — in that order, as lm-eval applies them.
    """

    regexes_to_ignore: tuple[str, ...] = ()
    ignore_case: bool = False
    ignore_punctuation: bool = False

    def normalise(self, text: str) -> str:
        for pattern in self.regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if self.ignore_case:
            text = text.lower()
        if self.ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        return text

    def __call__(self, prediction: str, answers: tuple[str, ...]) -> bool:
        guess = self.normalise(prediction.strip())  # lm-eval's remove_whitespace filter
        return any(guess == self.normalise(a) for a in answers)


@dataclass(frozen=True)
class Generation:
    """How a generative task decodes: greedily, until a stop string (or EOS) or ``max_gen_toks`` new tokens."""

    until: tuple[str, ...]
    """Stop strings; the output is cut before the first one (lm-eval's ``generation_kwargs.until``)."""
    max_gen_toks: int = 256
    """At most this many new tokens (lm-eval's default 256)."""
    metric: ExactMatch = field(default_factory=ExactMatch)
    """How a generation is compared with the accepted answers."""


def _choices_after(context: str, choices: list[str], gold: int, description: str = "") -> Doc:
    """The common layout: one shared context, each choice scored as ``" " + choice`` after it."""
    return Doc((context,), tuple(choices), gold, description)


def _arc(doc: dict) -> Doc:
    labels = doc["choices"]["label"]
    return _choices_after(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                          labels.index(doc["answerKey"]))


def _piqa(doc: dict) -> Doc:
    return _choices_after(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _sciq(doc: dict) -> Doc:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices_after(context, choices, 3)


def _openbookqa(doc: dict) -> Doc:
    labels = doc["choices"]["label"]
    return _choices_after(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


def _boolq(doc: dict) -> Doc:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _choices_after(context, ["no", "yes"], int(bool(doc["answer"])))


def _copa(doc: dict) -> Doc:
    # lm-eval drops the premise's final period, joins with a connector, and lower-cases the choice's first letter.
    # Its choices already start with a space and the default delimiter adds another: the continuation begins with
    # two spaces. We reproduce that so the numbers match.
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    context = doc["premise"].strip()[:-1] + f" {connector}"
    choices = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return _choices_after(context, choices, int(doc["label"]))


def _winogrande(doc: dict) -> Doc:
    # Partial scoring: each option fills the blank in its own context, and the shared rest of the sentence is the
    # continuation, so the options are compared on the same tokens. Its acc_norm equals acc (same continuation).
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (doc["option1"], doc["option2"]))
    return Doc(contexts, (sentence[blank + 1:].strip(),), {"1": 0, "2": 1}[doc["answer"]])


def _lettered(question: str, texts: list[str], prefix: str = "") -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts))
    return f"{prefix}{question}{options}\nAnswer:"


def _commonsense_qa(doc: dict) -> Doc:
    labels = doc["choices"]["label"]
    context = _lettered(doc["question"].strip(), doc["choices"]["text"], "Question: ")
    return _choices_after(context, labels, labels.index(doc["answerKey"]))


def _social_iqa(doc: dict) -> Doc:
    context = f"Q: {doc['context']} {doc['question']}\nA:"
    return _choices_after(context, [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)


def _mmlu(doc: dict) -> Doc:
    subject = doc["subject"].replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return _choices_after(_lettered(doc["question"].strip(), doc["choices"]), ["A", "B", "C", "D"],
                          int(doc["answer"]), header)


def _rte(doc: dict) -> Doc:
    context = f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:"
    return _choices_after(context, ["True", "False"], int(doc["label"]))


def _cb(doc: dict) -> Doc:
    context = f"{doc['premise']}\nQuestion: {doc['hypothesis']}. True, False, or Neither?\nAnswer:"
    return _choices_after(context, ["True", "False", "Neither"], int(doc["label"]))


def _mrpc(doc: dict) -> Doc:
    context = (f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\n"
               "Question: Do both sentences mean the same thing?\nAnswer:")
    return _choices_after(context, ["no", "yes"], int(doc["label"]))


def _sst2(doc: dict) -> Doc:
    context = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _choices_after(context, ["negative", "positive"], int(doc["label"]))


def _nq_open(doc: dict) -> Doc:
    answers = doc["answer"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answer' must be a non-empty list of strings")
    return Doc((f"Q: {doc['question']}?\nA:",), tuple(answers), 0, "Answer these questions:\n\n")


def _basic_arithmetic(doc: dict) -> Doc:
    # The file is multiple choice (allenai/basic_arithmetic); generatively, the right choice is the only answer.
    choices = doc["choices"]
    return Doc((doc["question"],), (choices["text"][choices["label"].index(doc["answerKey"])],))


@dataclass(frozen=True)
class Task:
    """A bundled task: its data, its document-to-prompt function and how it is scored."""

    name: str
    filename: str
    """The bundled jsonl file (in ``depthlab/eval/data``) of the split that is scored."""
    build: Callable[[dict], Doc]
    """Document -> prompt (lm-eval's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``)."""
    lmeval_split: str | None = "validation"
    """The split lm-eval's task of this name scores (None: lm-eval has no such task); ours is ``split``."""
    version: float | None = 1.0
    """The version (lm-eval ``metadata.version``) of the task definition reproduced."""
    split: str = "validation"
    """The split the bundled file holds."""
    fewshot_file: str | None = None
    """A separate few-shot split, whose first k documents with the same ``fewshot_group`` value are the shots
    (lm-eval's ``first_n`` sampler over MMLU's per-subject dev split); None: shots are drawn from ``split``."""
    fewshot_group: str | None = None
    """The document field that splits ``fewshot_file`` into per-subject pools."""
    fewshot_delimiter: str = "\n\n"
    """Placed after every shot (lm-eval's ``fewshot_delimiter``)."""
    generation: Generation | None = None
    """How to generate and score (generative tasks); None: multiple choice."""

    @property
    def output_type(self) -> str:
        return "multiple_choice" if self.generation is None else "generate_until"

    @property
    def fewshot_split(self) -> str:
        return "dev" if self.fewshot_file else self.split

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc", "acc_norm") if self.generation is None else ("exact_match",)

    @property
    def filter(self) -> str:
        """The name of the answer filter, the part after the comma in lm-eval's metric keys (``acc,none``): the
        generative tasks strip the generation (lm-eval's ``remove_whitespace`` filter list of nq_open)."""
        return "none" if self.generation is None else "remove_whitespace"


_NQ_ANSWER = ExactMatch(regexes_to_ignore=(r"\b(?:The |the |An |A |The |a |an )",), ignore_case=True,
                        ignore_punctuation=True)

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "arc_easy.jsonl", _arc, lmeval_split="test"),
    Task("arc_challenge", "arc_challenge.jsonl", _arc, lmeval_split="test"),
    Task("piqa", "piqa.jsonl", _piqa),
    Task("sciq", "sciq.jsonl", _sciq, lmeval_split="test"),
    Task("winogrande", "winogrande.jsonl", _winogrande),
    Task("openbookqa", "openbookqa.jsonl", _openbookqa, lmeval_split="test"),
    Task("boolq", "boolq.jsonl", _boolq, version=2.0),
    Task("copa", "copa.jsonl", _copa),
    Task("commonsense_qa", "commonsense_qa.jsonl", _commonsense_qa, version=None),
    Task("social_iqa", "social_iqa.jsonl", _social_iqa, version=0.0),
    Task("mmlu", "mmlu_validation.jsonl", _mmlu, lmeval_split="test", fewshot_file="mmlu_dev.jsonl",
         fewshot_group="subject"),
    Task("rte", "rte.jsonl", _rte),
    Task("cb", "cb.jsonl", _cb),
    Task("mrpc", "mrpc.jsonl", _mrpc),
    Task("sst2", "sst2.jsonl", _sst2),
    Task("nq_open", "nq_open.jsonl", _nq_open, version=4.0, fewshot_delimiter="\n",
         generation=Generation(until=("\n", ".", ","), metric=_NQ_ANSWER)),
    Task("basic_arithmetic", "basic_arithmetic.jsonl", _basic_arithmetic, lmeval_split=None,
         generation=Generation(until=("\n",), max_gen_toks=16)),
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


def data_path(task: str, fewshot: bool = False) -> Path:
    """Where the bundled jsonl file of ``task`` (or of its separate few-shot split) lives."""
    filename = TASKS[task].fewshot_file if fewshot else TASKS[task].filename
    return Path(str(resources.files("depthlab.eval").joinpath("data", filename)))


def _read_docs(path: Path, task: str, limit: int | None = None) -> list[tuple[dict, Doc]]:
    """The first ``limit`` documents of ``path`` with their prompts; a line that is not JSON, or lacks a field the
    prompt needs, raises EvalError naming the file and the line."""
    build = TASKS[task].build
    docs: list[tuple[dict, Doc]] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise EvalError(f"cannot read task file {path}: {e.strerror or e}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                doc = build(raw)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise EvalError(f"{path}:{lineno}: malformed {task} document ({type(e).__name__}: {e})") from None
            if not 0 <= doc.gold < doc.n_choices:
                raise EvalError(f"{path}:{lineno}: answer index {doc.gold} out of range for {doc.n_choices} choices")
            docs.append((raw, doc))
    if not docs:
        raise EvalError(f"task file {path} has no examples")
    return docs


def count_documents(task: str) -> int:
    """How many documents the scored split of ``task`` has."""
    with data_path(task).open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _fewshot_pools(task: Task) -> dict[str, list[Doc]]:
    """A separate few-shot split, by ``fewshot_group`` value, in file order."""
    pools: dict[str, list[Doc]] = {}
    for raw, doc in _read_docs(data_path(task.name, fewshot=True), task.name):
        pools.setdefault(raw[task.fewshot_group], []).append(doc)
    return pools


def check_fewshot(task: str, k: int) -> None:
    """Raise EvalError unless ``task`` can give every document ``k`` shots."""
    t = TASKS[task]
    if k < 0:
        raise EvalError(f"the number of few-shot examples must be >= 0, got {k}")
    if k == 0:
        return
    if t.fewshot_file:
        most = min(len(p) for p in _fewshot_pools(t).values())
        where = f"its {t.fewshot_split} split has {most} examples per {t.fewshot_group}"
    else:
        most = count_documents(task) - 1
        where = f"its shots come from its own {t.split} split of {most + 1} documents, less the one evaluated"
    if k > most:
        raise EvalError(f"{task} allows at most {most} few-shot examples ({where}), got {k}")


def _shots(task: Task, docs: list[tuple[dict, Doc]], k: int, seed: int) -> list[list[Doc]]:
    """The k shots of each document in ``docs``, chosen as lm-eval chooses them (see the module docstring)."""
    check_fewshot(task.name, k)
    if k == 0:
        return [[] for _ in docs]
    if task.fewshot_file:
        pools = _fewshot_pools(task)
        missing = sorted({raw[task.fewshot_group] for raw, _ in docs} - set(pools))
        if missing:
            raise EvalError(f"{task.name}'s {task.fewshot_split} split has no examples for {', '.join(missing)}")
        return [pools[raw[task.fewshot_group]][:k] for raw, _ in docs]
    pool = _read_docs(data_path(task.name), task.name) if len(docs) < count_documents(task.name) else docs
    raws = [raw for raw, _ in pool]
    rnd = random.Random(seed)
    out = []
    for raw, _ in docs:
        picked = [i for i in rnd.sample(range(len(pool)), k + 1) if raws[i] != raw][:k]
        if len(picked) < k:  # the document occurs more than once in the split: lm-eval draws again without it
            picked = rnd.sample([i for i in range(len(pool)) if raws[i] != raw], k)
        out.append([pool[i][1] for i in picked])
    return out


def load_examples(task: str, limit: int | None = None, num_fewshot: int = 0,
                  seed: int = FEWSHOT_SEED) -> list[Example] | list[Question]:
    """The first ``limit`` documents of ``task`` (all when None, file order) as scored examples with
    ``num_fewshot`` shots each (chosen with ``seed``): ``Example`` for multiple choice, ``Question`` for generative."""
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be a positive number of examples, got {limit}")
    spec = TASKS[task]
    docs = _read_docs(data_path(task), task, limit)
    examples: list = []
    for (_, doc), shots in zip(docs, _shots(spec, docs, num_fewshot, seed)):
        prefix = doc.description + "".join(s.answered() + spec.fewshot_delimiter for s in shots)
        if spec.generation is not None:
            examples.append(Question(prefix + doc.contexts[0], doc.answers))
        elif len(doc.contexts) > 1:
            continuation = DELIMITER + doc.answers[0]
            examples.append(Example(tuple((prefix + c, continuation) for c in doc.contexts), doc.gold,
                                    (len(doc.answers[0]),) * len(doc.contexts)))
        else:
            examples.append(Example(tuple((prefix + doc.contexts[0], DELIMITER + a) for a in doc.answers), doc.gold,
                                    tuple(len(a) for a in doc.answers)))
    return examples
