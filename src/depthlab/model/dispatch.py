"""Models spread over devices or offloaded, through Hugging Face accelerate's big-model dispatch.

accelerate places each module of a *device map* (``{"model.layers.3": 1, "model.layers.20": "disk", ...}``) on a GPU,
the CPU or disk and wraps it in an ``AlignDevicesHook``: its forward moves the inputs to the module's *execution
device* and, for an offloaded module, loads the weights from its ``weights_map`` (CPU memory or memory-mapped files
in the offload folder) for the call and drops them back to the ``meta`` device afterwards. Calling a block is
therefore enough to run it where it lives. What depthlab needs on top, defined here once:

* `execution_device(module)`: where a module computes (its hook's device, else its parameters').
* `named_tensors(module)`: its parameters and persistent buffers with real values, offloaded ones read one at a time
  from the weights map (weights hashing, and a swap that runs block b's weights at position p).
* `offload_paused(module)`: a context in which the module's hooks still move inputs but no longer load their own
  weights, so `torch.func.functional_call` can run it with another block's weights.
* `validate_device_map` / `dispatch`: the checks on a device map, offload folder and ``max_memory`` before anything
  is loaded, and accelerate's dispatch for models not loaded by ``from_pretrained`` (depthlab's own Transformer).
* `parse_size`, `parse_device_map`, `parse_max_memory`: the CLI's ``2GiB`` sizes, ``--device-map`` and
  ``--max-memory DEV=SIZE,...``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from depthlab.errors import ModelLoadError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
"""Byte units accepted in sizes ("2GiB", "500MB", "1e9")."""
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | float, what: str = "size") -> int:
    """Bytes from "2GiB", "500MB", "1e9" or a number; a one-line ModelLoadError otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if m is None or m.group(2).upper() not in UNITS:
            raise ModelLoadError(f"{what}: cannot read {text!r} as a size (e.g. 2GiB, 500MB, 1e9)")
        value, unit = float(m.group(1)), m.group(2).upper()
    if value < 0:
        raise ModelLoadError(f"{what} must be >= 0, got {text!r}")
    if not math.isfinite(value * UNITS[unit]):  # 1e400 reads as inf
        raise ModelLoadError(f"{what}: {text!r} is not a finite size")
    return int(value * UNITS[unit])


def parse_device_map(text: str):
    """The CLI's --device-map: "auto" (or balanced, balanced_low_0, sequential) or a JSON object {module: device}."""
    text = text.strip()
    if not text.startswith("{"):
        return text
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"--device-map: not a JSON object ({e.msg}); e.g. auto or "
                             '\'{"model.layers.0": 0, "model.layers.1": "disk"}\'') from None
    return value


def parse_max_memory(text: str) -> dict:
    """The CLI's --max-memory "cpu=8GiB,0=20GiB" → {"cpu": bytes, 0: bytes}."""
    out = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        device, sep, size = item.partition("=")
        if not sep or not device.strip():
            raise ModelLoadError(f"--max-memory expects DEVICE=SIZE[,DEVICE=SIZE...] (e.g. cpu=8GiB,0=20GiB), "
                                 f"got {item!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = parse_size(size, f"--max-memory {device}")
    if not out:
        raise ModelLoadError("--max-memory is empty")
    return out


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", (hook,)))


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` (a device map with several devices or offloaded modules)."""
    return any(_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its (first) accelerate hook's execution device, else its first real tensor's."""
    for m in module.modules():
        for hook in _hooks(m):
            if getattr(hook, "execution_device", None) is not None:
                device = hook.execution_device
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next((t.device for t in module.parameters() if not t.is_meta), torch.device("cpu"))


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`module.state_dict()` with real values: tensors offloaded by accelerate are read from their weights map, one
    at a time (so a model larger than memory can be walked)."""
    maps = []  # (prefix, weights_map) of every offloading hook inside `module`
    for prefix, m in module.named_modules():
        for hook in _hooks(m):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                maps.append((f"{prefix}." if prefix else "", hook.weights_map))
    for name, t in module.state_dict(keep_vars=True).items():
        if t.is_meta:
            prefix, weights = next(((p, w) for p, w in maps if name.startswith(p)), (None, None))
            if weights is None:
                raise ModelLoadError(f"{name} is on the meta device and no offload hook holds its value")
            t = weights[name[len(prefix):]]
        yield name, t.detach()


@contextlib.contextmanager
def offload_paused(module: nn.Module):
    """Within the context, `module`'s accelerate hooks move inputs to its execution device but do not load (or drop)
    their own weights: the caller supplies the weights (``torch.func.functional_call``)."""
    hooks = [h for m in module.modules() for h in _hooks(m) if getattr(h, "offload", False)]
    for h in hooks:
        h.offload = False
    try:
        yield
    finally:
        for h in hooks:
            h.offload = True


# -------------------------------------------------------------------------------------------------------------- #
def _check_device(device, where: str) -> None:
    if device in ("cpu", "disk", "meta"):
        if device == "meta":
            raise ModelLoadError(f"{where}: 'meta' is not a device a model can run on")
        return
    index = device if isinstance(device, int) else None
    if isinstance(device, str):
        m = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", device)
        if m is None:
            raise ModelLoadError(f"{where}: unknown device {device!r} (use cpu, disk, cuda:i or a GPU index)")
        index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index is None or index < 0 or index >= count:
        raise ModelLoadError(f"{where}: device {device!r} does not exist on this machine "
                             f"({count} CUDA device{'s' if count != 1 else ''})")


def validate_device_map(device_map, offload_folder, max_memory) -> tuple:
    """Check a device map ("auto", "balanced", ... or {module: device}), offload folder and max_memory
    ({device: size}) before loading → (device_map, offload_folder as str or None, max_memory in bytes or None)."""
    if isinstance(device_map, dict):
        if not device_map:
            raise ModelLoadError("device_map is empty")
        for name, device in device_map.items():
            _check_device(device, f"device_map[{name!r}]")
        needs_folder = "disk" in device_map.values()
    elif device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        needs_folder = False
    else:
        raise ModelLoadError(f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict "
                             f"{{module: device}}, got {device_map!r}")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ModelLoadError("max_memory must map devices to sizes, e.g. {'cpu': '4GiB', 0: '20GiB'}")
        for device in max_memory:
            _check_device(device, f"max_memory[{device!r}]")
        max_memory = {(int(d.removeprefix("cuda:")) if isinstance(d, str) and d.removeprefix("cuda:").isdigit()
                       else d): parse_size(v, f"max_memory[{d!r}]") for d, v in max_memory.items()}
    if offload_folder is not None:
        if not str(offload_folder).strip():  # Path("") is the current folder: never offload into it unasked
            raise ModelLoadError("the offload folder is empty: name a folder (--offload-folder DIR)")
        folder = Path(offload_folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelLoadError(f"offload folder {folder} cannot be created: {e.strerror or e}") from None
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ModelLoadError(f"offload folder {folder} is not a writable folder")
        offload_folder = str(folder)
    elif needs_folder:
        raise ModelLoadError("the device map puts modules on 'disk': pass an offload folder (--offload-folder DIR)")
    return device_map, offload_folder, max_memory


def check_budget(max_memory: dict | None, block_bytes: int) -> None:
    """A device given less memory than one block's weights can hold no block: refuse it rather than offload all."""
    for device, size in (max_memory or {}).items():
        if device != "disk" and 0 < size < block_bytes:
            raise ModelLoadError(f"max_memory[{device!r}] = {size} bytes is smaller than one block's weights "
                                 f"({block_bytes} bytes)")


def dispatch(model: nn.Module, device_map, offload_folder: str | None, max_memory: dict | None,
             no_split: list[str]) -> nn.Module:
    """accelerate's dispatch for a model already in CPU memory ("auto"-like maps are inferred per `no_split` class)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if not isinstance(device_map, dict):
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise ModelLoadError("the model does not fit max_memory and would go to disk: pass an offload folder")
    try:
        return dispatch_model(model, device_map, offload_dir=offload_folder)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot dispatch the model with this device map: {str(e).splitlines()[0]}") from None
