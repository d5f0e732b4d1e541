"""Lazy package exports: a package lists ``name → module`` and imports each module only when the name is used.

This keeps ``import depthlab`` and ``depthlab --help`` fast (torch, transformers and matplotlib load only for the
features that need them).
"""

from __future__ import annotations

import importlib
from typing import Any


def lazy_getattr(namespace: dict[str, Any], exports: dict[str, str]):
    """A module-level ``__getattr__`` for the package whose ``globals()`` is `namespace`."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value  # cache: later look-ups skip __getattr__
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
