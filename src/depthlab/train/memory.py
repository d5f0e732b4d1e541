"""Up-front memory check of a training run: refuse a config that cannot fit before anything is allocated.

Estimate, in bytes, for one rank (fp32 master weights, AdamW):

    state        = 16·P                          weights, gradients and two AdamW moments, 4 bytes each
    activations  = 4·B·T·(L·(10·d + 3·H + h·T) + 3·V)
                                                 per token of one micro-batch (B sequences of T tokens), each block
                                                 keeps ~10 residual-width tensors (norm inputs/outputs, q, k, v,
                                                 attention output, branch outputs), 3 of the FFN's hidden width H
                                                 and h·T attention probabilities (the math SDPA path); the LM head
                                                 keeps logits and their gradient (~3·V per token)

P counts every parameter (`param_counts`), B is the micro-batch, h the number of heads. It is deliberately rough (it
ignores the allocator, autocast copies and sharding) and is compared with the machine's *total* memory, not what is
free at the moment, so it only refuses runs that could not fit on an idle machine, never a run that merely might
not fit on a busy one.
"""

from __future__ import annotations

import torch

from depthlab.config import Config
from depthlab.errors import ConfigError
from depthlab.model.params import human, param_counts
from depthlab.precision import device_memory, human_bytes


def estimate_bytes(cfg: Config, micro_batch: int) -> tuple[int, int]:
    """(parameter count, estimated peak bytes) of training `cfg` with `micro_batch` sequences per forward."""
    m = cfg.model
    params = param_counts(m).total
    per_token = m.n_layers * (10 * m.d_model + 3 * m.hidden + m.n_heads * m.seq_len) + 3 * m.vocab_size
    return params, 16 * params + 4 * micro_batch * m.seq_len * per_token


def check_fits(cfg: Config, micro_batch: int, device: torch.device) -> None:
    """Raise a one-line ConfigError when the estimate exceeds the device's total memory."""
    params, need = estimate_bytes(cfg, micro_batch)
    have = device_memory(device)[0]
    if have is not None and need > have:
        raise ConfigError(f"this config needs about {human_bytes(need)} on {device} ({human(params)} parameters, micro-batch "
                          f"{micro_batch}x{cfg.model.seq_len} tokens) but the machine has {human_bytes(have)}: shrink "
                          "model.* sizes, trainer.micro_batch_size or model.seq_len")
