"""The README's tour is true to the CLI: every line parses, and the data it prepares is what its train lines use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from depthlab.cli import build_parser
from depthlab.cli.common import normalize_overrides

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TOUR = README.split("## A 5-minute tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
COMMANDS = [shlex.split(line, comments=True) for line in TOUR.splitlines()
            if re.match(r"\s*(torchrun .* -m )?depthlab ", line)]


def _argv(words: list[str]) -> list[str]:
    words = words[words.index("depthlab") + 1:]
    return words[:words.index("&&")] if "&&" in words else words


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(_argv(w))[:50] for w in COMMANDS])
def test_every_tour_line_parses(words):
    args, extra = build_parser().parse_known_args(normalize_overrides(_argv(words)))
    assert args.command and (not extra or getattr(args, "accepts_overrides", False)), extra


def test_the_tour_trains_on_the_data_it_prepares():
    prepared = [w[w.index("--out") + 1] for w in COMMANDS if _argv(w)[:2] == ["data", "prepare"]]
    assert prepared
    fresh_trains = [w for w in COMMANDS if _argv(w)[0] == "train" and "--resume" not in w]
    assert fresh_trains and all(f"--data.path={prepared[0]}" in w for w in fresh_trains)
