"""Which device and compute dtype to use: the one resolver behind every `--device` and `--dtype`, and how much
memory a device has (`device_memory`, for the up-front checks of training and analysis).

bf16 is the fast path on GPUs and on CPUs with native bf16 matmul units (AVX512-BF16, AMX). On CPUs without them
(AVX2-only machines, e.g. the 2-core machines this project is developed on) bf16 matmuls are emulated and measured
~50-70x *slower* than fp32, so "auto" picks fp32 there. fp16 is offered for inference only (training would need a
loss scaler). Torch is imported inside the functions so that the CLI can list the names without loading it.
"""

from __future__ import annotations

import functools

DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
"""What `--dtype` accepts everywhere (auto: bf16 where it is fast, else fp32)."""
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


BF16_CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
"""torch.cpu's feature probes for native bf16 matmul units. torch's dispatch level
(`torch.backends.cpu.get_cpu_capability()`) says only "AVX512" on such CPUs, so it cannot tell them apart; measured
on a 2-core Xeon with AMX: a bf16 SmolLM2 forward pass 3.0x faster than fp32, a d=512 training step 2.1x
(benchmarks/cpu_bf16.py)."""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), by torch.cpu's probes (False where this
    torch lacks them)."""
    import torch

    return any(probe() for name in BF16_CPU_PROBES if (probe := getattr(torch.cpu, name, None)) is not None)


def resolve_device(name=None):
    """'auto' (or None) | 'cpu' | 'cuda[:i]' | 'mps' | a torch.device → a device this machine has.

    A misspelt name or CUDA on a CPU-only machine is a one-line ConfigError, not a crash later on.
    """
    import torch

    from depthlab.errors import ConfigError

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(name)!r} (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name, device=None):
    """'auto' | 'fp32' | 'bf16' | 'fp16' (or float32/bfloat16/float16, or a torch dtype) → a torch dtype.

    auto: bf16 on CUDA devices with bf16 support and on CPUs with native bf16 units, fp32 elsewhere.
    """
    import torch

    from depthlab.errors import ConfigError

    if isinstance(name, torch.dtype):
        return name
    name = _ALIASES.get(name, name)
    if name == "auto":
        device = resolve_device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    return table[name]


def dtype_name(dtype) -> str:
    """torch.float32 → 'fp32' (the spelling results files and the CLI use)."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).removeprefix("torch."),
                                                                         str(dtype).removeprefix("torch."))


def device_memory(device) -> tuple[int | None, int | None]:
    """(total, available) bytes of a device: GPU memory for CUDA (``mem_get_info``), physical RAM and the kernel's
    ``MemAvailable`` otherwise; None where the platform does not say."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        total = None
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        available = None
    return total, available


def human_bytes(n: int) -> str:
    """A byte count for a message: 12.0 KiB, 3.4 MiB, 1.5 GiB (or 3.10e+21 bytes beyond what GiB reads well)."""
    if n >= 2**70:
        return f"{n:.2e} bytes"
    unit = next(u for u in (3, 2, 1, 0) if n >= 2 ** (10 * u) or u == 0)
    return f"{n / 2 ** (10 * unit):,.1f} {('bytes', 'KiB', 'MiB', 'GiB')[unit]}" if unit else f"{n} bytes"
