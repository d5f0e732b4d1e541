"""Result objects shared by every metric: dataclasses whose ``to_dict()`` is plain JSON (lists, floats, None)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


def to_jsonable(value):
    """Tensors and arrays become nested lists, non-finite floats become None, dataclasses become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().double().numpy() if value.is_floating_point()
                           else value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Result:
    """Mixin for metric results: ``to_dict()`` gives the JSON form written to results.json."""

    def to_dict(self) -> dict:
        return to_jsonable(self)

