"""Data-parallel plumbing: a single-process no-op, or torchrun ranks (gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node=K -m depthlab train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; `Dist.from_env` reads them.
Each rank draws its slice of the global batch (see `depthlab.data.sample_batch`), so K ranks × B/K sequences see
exactly the batch one process would.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        if not tdist.is_initialized():
            tdist.init_process_group(backend)
        return cls(rank, world, local, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        if not self.enabled:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            return fully_shard(model)
        device_ids = [self.local_rank] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Unsharded model weights (tied tensors once) and optimizer state, keyed by parameter name.

        Under FSDP this is a collective (every rank must call it); the result is complete on every rank.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        from depthlab.checkpoint import model_state

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optim = get_state_dict(model, optimizer, options=options)
        if not self.enabled:
            return model_state(model), optim
        if getattr(model.config, "tie_embeddings", False):
            weights.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in weights.items()}, optim

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def no_sync(self, model: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch (DDP only)."""
        if self.enabled and not last and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            tdist.all_reduce(value)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
