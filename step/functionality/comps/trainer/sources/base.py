"""What every batch source shares: the batch record, sharding and epoch seeding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import _distributed as ddp
from .._plan import TrainingPlan


@dataclass
class Batch:
    """One step's work for this process.

    Attributes
    ----------
    compute
        Returns the batch's named loss terms (called by the training step or the
        evaluation loop, which set the mode); ``None`` for an empty turn.
    n_obs
        Observations the loss terms average over (their weight in running means and in
        the gradient average across processes).
    ids
        Which items the batch covers (cell positions, node ids), for bookkeeping.
    """

    compute: Callable[[], Mapping[str, torch.Tensor]] | None
    n_obs: int
    ids: Any = None

    @classmethod
    def empty(cls) -> Batch:
        return cls(None, 0)


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world: int = 1


def set_loader_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make a loader's shuffling a function of the epoch, so resumed runs match.

    Calls ``set_epoch`` where the loader or its sampler has one; otherwise re-seeds the
    sampler's own ``torch.Generator`` with ``seed``. Loaders without either shuffle with
    torch's global generator, whose state the checkpoints hold.
    """
    candidates = [loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)]
    candidates += [getattr(c, "sampler", None) for c in candidates[1:] if c is not None]
    for obj in candidates:
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return
    for obj in candidates:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)
            return


def share_sampler_seed(sampler: Any) -> None:
    """Give a seeded sampler rank 0's seed, so every process walks the same sequence."""
    if ddp.world_size() > 1 and callable(getattr(sampler, "state_dict", None)):
        state = sampler.state_dict()
        if "seed" in state:
            sampler.load_state_dict({**state, "seed": ddp.broadcast_int(state["seed"])})


def steps_per_process(n_items: int | None, shard: Shard) -> int | None:
    """Optimizer steps of an epoch of ``n_items`` batches split over the processes."""
    return None if n_items is None else -(-n_items // shard.world)


class BatchSource:
    """Produce the batches of a loop and say how to compute their loss.

    A source only produces work; the fit loop decides when to train, validate, stop and
    save. Subclasses override :meth:`batches` and, when they validate,
    :meth:`validation_batches`; state that shapes future batches goes into
    :meth:`state_dict`. After :meth:`bind`, ``self.plan`` (a :class:`TrainingPlan`)
    computes loss terms and ``self.shard`` says which share of the work is this
    process's.

    Attributes
    ----------
    name
        The loop name recorded in the history and the checkpoints.
    valid_every
        Validate every this many optimizer steps as well (None: at epoch ends only).
    """

    name = "custom"
    valid_every: int | None = None

    def __init__(self) -> None:
        self.plan: TrainingPlan | None = None
        self.shard = Shard()

    def bind(self, plan: TrainingPlan, shard: Shard) -> None:
        """Attach the plan and this process's shard; check the model (loop start)."""
        self.plan, self.shard = plan, shard

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Prepare epoch ``epoch``; ``seed`` is a seed derived from the run and the epoch."""

    def batches(self) -> Iterator[Batch]:
        """This process's training batches of the current epoch."""
        raise NotImplementedError

    def n_steps(self) -> int | None:
        """Optimizer steps of the current epoch, when known."""
        return None

    def validation_batches(self) -> Iterable[Batch] | None:
        """This process's validation batches, or None when the loop does not validate."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
