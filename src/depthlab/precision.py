"""Which compute dtype to use where.

bf16 is the fast path on GPUs and on CPUs with native bf16 matmul units (AVX512-BF16, AMX). On CPUs without them
(AVX2-only machines, e.g. the 2-core machines this project is developed on) bf16 matmuls are emulated and measured
~50-70x *slower* than fp32, so "auto" picks fp32 there.
"""

from __future__ import annotations

import functools

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX", "AVX512_AMX")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'bf16' | 'fp32' | 'auto' → a torch dtype for `device` (auto: bf16 where it is fast, else fp32)."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
