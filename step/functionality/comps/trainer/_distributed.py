"""Helpers for data-parallel training under ``torchrun`` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    """World size announced by ``torchrun`` in the environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes; return whether it is active.

    Uses NCCL for CUDA devices and gloo otherwise. Does nothing when a group already
    exists or when the environment names a single process.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_agree(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank."""
    return not all_agree(not flag, device)


class LossForward(nn.Module):
    """Route ``forward`` to a model's loss method so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str | Callable, *args: Any, **kwargs: Any
                ) -> Mapping[str, torch.Tensor]:
        fn = method if callable(method) else getattr(self.model, method)
        return fn(*args, **kwargs)


class ShardedIndexBatches:
    """Index batches of one rank's share of ``n`` items, reshuffled per epoch.

    Every rank gets the same number of batches (the permutation is padded by wrapping
    around), as data-parallel training requires. ``set_epoch`` makes the order a function
    of the epoch and the seed only.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if n < 1 or batch_size < 1:
            msg = f"need at least one item and batch_size >= 1; got n={n}, batch_size={batch_size}."
            raise ValueError(msg)
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        per_rank = -(-self.n // self.world_size)
        order = np.resize(order, per_rank * self.world_size)  # wrap around to pad
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        idx = self._indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            yield idx[start:start + self.batch_size]

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)
