"""dtype=auto: bf16 exactly where it is fast (CUDA with bf16, CPUs with native bf16 units), fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from depthlab import precision
from depthlab.errors import ConfigError


@pytest.fixture
def cpu_features(monkeypatch):
    """Set what torch.cpu's bf16 probes answer (None: this torch has no such probe)."""
    def set_features(**answers):
        for name in precision.BF16_CPU_PROBES:
            if answers.get(name) is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, lambda value=answers[name]: value)
        precision.cpu_has_fast_bf16.cache_clear()
    yield set_features
    monkeypatch.undo()
    precision.cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, torch.float32),   # AVX2-only (or AVX-512 without bf16): bf16 is emulated, 50-140x slower
    (True, False, torch.bfloat16),   # AVX512-BF16
    (False, True, torch.bfloat16),   # AMX tiles
    (None, None, torch.float32),     # a torch without the probes: the safe choice
])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(cpu_features, avx512_bf16, amx, expected):
    cpu_features(_is_avx512_bf16_supported=avx512_bf16, _is_amx_tile_supported=amx)
    assert precision.resolve_dtype("auto", "cpu") == expected
    assert precision.resolve_dtype("fp32", "cpu") == torch.float32  # explicit names are never second-guessed
    assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_torch_dispatch_level_does_not_decide(cpu_features, monkeypatch):
    """On AMX CPUs torch reports its dispatch level as plain "AVX512"; the probes, not it, decide."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu_features(_is_avx512_bf16_supported=False, _is_amx_tile_supported=True)
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        precision.resolve_dtype("fp8", "cpu")
