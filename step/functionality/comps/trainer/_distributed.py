"""Data-parallel helpers for ``torchrun`` (gloo on CPU, NCCL on GPU).

Every process walks the same, identically seeded sequence of batches and takes every
``world_size``-th one (:func:`round_robin`), so the shards of an epoch are disjoint and
cover the data exactly once. Gradients are averaged with the observation count of each
process as its weight (:func:`sync_gradients`), so a process whose last turn has no batch
contributes nothing instead of stalling the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def env_world_size() -> int:
    """World size announced by ``torchrun`` in the environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes; return whether it is active."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one process."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every process."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sync_rng() -> None:
    """Give every process rank 0's torch CPU generator state.

    Loaders that shuffle with the global generator then draw the same order everywhere,
    whatever each process drew in between (e.g. dropout on batches of other sizes).
    """
    if world_size() == 1:
        return
    state = torch.get_rng_state()
    buf = state.to(_comm_device())
    dist.broadcast(buf, src=0)
    torch.set_rng_state(buf.cpu())


def sync_gradients(params: Sequence[nn.Parameter], n_obs: int, total: torch.Tensor | None
                   ) -> torch.Tensor:
    """Average gradients over processes, each weighted by its observation count.

    Each process's loss is a mean over its ``n_obs`` observations; the result is the
    gradient of the mean over all observations of this step. A parameter that has no
    gradient on any process keeps none. Returns the step's total loss over all processes
    (NaN when any process had a non-finite one, so that every process skips the step).
    """
    device = params[0].device
    total = torch.zeros((), device=device) if total is None else total.detach().float()
    has = [p.grad is not None for p in params]
    # a small first exchange: observation counts, weighted totals, which grads exist
    head = torch.tensor([float(n_obs), *map(float, has)], device=device)
    head = torch.cat([head, (total * float(n_obs)).reshape(1)])
    if world_size() > 1:
        dist.all_reduce(head, op=dist.ReduceOp.SUM)
    count = float(head[0].clamp_min(1.0))
    present = head[1:-1].tolist()
    # then one buffer of gradients, pre-scaled so that the sum is the weighted mean
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).float()
    flat.mul_(float(n_obs) / count)
    if world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, flag in zip(params, present):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if flag > 0 else None
        offset += n
    return head[-1] / count


def reduce_sums(sums: Mapping[str, float], counts: Mapping[str, float]
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Sum named totals and counts over processes (keys may differ between processes)."""
    if world_size() == 1:
        return dict(sums), dict(counts)
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, sorted(sums))
    keys = sorted({k for ks in everyone for k in ks})
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys]
                     + [float(counts.get(k, 0.0)) for k in keys], dtype=torch.float64,
                     device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    values = t.tolist()
    return dict(zip(keys, values[:len(keys)])), dict(zip(keys, values[len(keys):]))


def check_same(what: str, values: Any) -> None:
    """Refuse to go on when processes hold different ``values`` (e.g. another split)."""
    if world_size() == 1:
        return
    import hashlib

    import numpy as np

    digest = hashlib.sha1(np.ascontiguousarray(np.asarray(values)).tobytes()).hexdigest()
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, digest)
    if len(set(everyone)) > 1:
        msg = (f"the processes hold different {what}; draw the split after creating the "
               "Trainer (it joins the process group, and splits drawn then are shared) or "
               "pass the same seed on every process.")
        raise ValueError(msg)


def round_robin(items: Iterable[T], *, rank: int, world: int) -> Iterator[T | None]:
    """This process's share of ``items``: every ``world``-th one, starting at ``rank``.

    Every process yields the same number of values: in the last round a process without
    an item yields ``None`` (an empty turn).
    """
    if world == 1:
        yield from items
        return
    n = 0
    for i, item in enumerate(items):
        n = i + 1
        if i % world == rank:
            yield item
    if n % world and rank >= n % world:
        yield None
