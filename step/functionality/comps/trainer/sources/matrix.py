"""Sources over a count matrix: the whole matrix per step, or mini-batches of cells."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .. import _distributed as ddp
from .._device_cache import DeviceCachedLoader
from .._plan import as_inputs, n_obs
from .base import Batch, BatchSource, Shard, set_loader_epoch, steps_per_process


def unpack_loaders(loaders: Any) -> tuple[Any, Any]:
    """Accept ``(train, valid)``, ``(train,)`` or a single loader."""
    if isinstance(loaders, (list, tuple)):
        if len(loaders) == 1:
            return loaders[0], None
        if len(loaders) == 2:
            return loaders[0], loaders[1]
        msg = f"loaders must be (train_loader, valid_loader); got {len(loaders)} items."
        raise ValueError(msg)
    if loaders is None:
        msg = "train_batch needs a training loader."
        raise ValueError(msg)
    return loaders, None


def _is_index_loader(loader: Any) -> bool:
    """A loader made by ``index_loader``: its sampler yields position arrays that the
    dataset gathers in one call, so a process can fetch only its own batches."""
    return (getattr(loader, "batch_size", 0) is None and getattr(loader, "num_workers", 1) == 0
            and hasattr(getattr(loader, "dataset", None), "subset")
            and getattr(loader, "sampler", None) is not None)


class MiniBatchSource(BatchSource):
    """Mini-batches from a ``(train_loader, valid_loader)`` pair (the second may be None).

    Under data-parallel training every process takes every ``world``-th batch of the
    same shuffled sequence; loaders made by :func:`make_loaders` fetch only those.

    Parameters
    ----------
    loaders
        ``(train, valid)``, ``(train,)`` or one loader, yielding batch dicts (``x``,
        ``library``, ...) or tuples of tensors.
    call_func
        Computes the loss terms of a batch (moved to the device) instead of
        ``model.loss``.
    cache_on_device
        Densify the loaders' datasets on the device once and gather batches there.
    steps_per_epoch
        End each epoch after this many optimizer steps (the first batches of the epoch's
        shuffled order; each epoch draws a new order), for data too large for full
        passes. ``None``: one full pass of the training loader.
    """

    name = "train_batch"

    def __init__(self, loaders: Any, call_func: Callable | None = None, *,
                 cache_on_device: bool = False, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        self.train_loader, self.valid_loader = unpack_loaders(loaders)
        self.call_func = call_func
        self.cache_on_device = cache_on_device
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool)
                                            or int(steps_per_epoch) < 1):
            msg = f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}."
            raise ValueError(msg)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self._caches: dict[int, DeviceCachedLoader] = {}

    def bind(self, plan: Any, shard: Shard) -> None:
        super().bind(plan, shard)
        if self.call_func is None:
            plan.require("loss", "train_batch")
        if shard.world > 1:
            for part, loader in (("training", self.train_loader), ("validation", self.valid_loader)):
                ids = getattr(getattr(loader, "dataset", None), "indices", None)
                if ids is not None:
                    ddp.check_same(f"{part} cells", ids)
                if _is_index_loader(loader):
                    # whole cached blocks would hold other processes' rows: read only ours
                    loader.dataset.root.set_read_blocks(None)
        if self.cache_on_device:
            for loader in (self.train_loader, self.valid_loader):
                if loader is not None and id(loader) not in self._caches:
                    self._caches[id(loader)] = DeviceCachedLoader(loader, plan.device)

    def set_epoch(self, epoch: int, seed: int) -> None:
        set_loader_epoch(self.train_loader, epoch, seed)

    def _batch(self, inputs: Any, ids: Any = None) -> Batch:
        if self.call_func is None:
            inputs = as_inputs(inputs)
        return Batch(lambda: self.plan.loss(inputs, self.call_func), n_obs(inputs), ids)

    def _from(self, loader: Any) -> Iterator[Batch]:
        cache = self._caches.get(id(loader))
        if cache is not None or _is_index_loader(loader):
            gather = cache.gather if cache is not None else loader.dataset.__getitem__
            for idx in ddp.round_robin(loader.sampler, **self._split()):
                yield Batch.empty() if idx is None else self._batch(gather(idx), idx)
            return
        for inputs in ddp.round_robin(loader, **self._split()):
            yield Batch.empty() if inputs is None else self._batch(inputs)

    def _split(self) -> dict[str, int]:
        return {"rank": self.shard.rank, "world": self.shard.world}

    def batches(self) -> Iterator[Batch]:
        batches = self._from(self.train_loader)
        if self.steps_per_epoch is None:
            return batches
        return itertools.islice(batches, self.steps_per_epoch)

    def n_steps(self) -> int | None:
        try:
            steps = steps_per_process(len(self.train_loader), self.shard)
        except TypeError:
            steps = None
        if self.steps_per_epoch is None:
            return steps
        return self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)

    def validation_batches(self) -> Iterable[Batch] | None:
        return None if self.valid_loader is None else self._from(self.valid_loader)


def _positions(ind: Any, n: int) -> np.ndarray:
    pos = np.array(ind, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        msg = "the index set is empty."
        raise ValueError(msg)
    if pos.min() < 0 or pos.max() >= n:
        msg = f"indices must lie in [0, {n}); got range [{pos.min()}, {pos.max()}]."
        raise IndexError(msg)
    return pos


class FullMatrixSource(BatchSource):
    """The whole (training part of the) matrix in one step per epoch.

    ``X`` is a dataset, a dict of tensors or a counts tensor, gathered once and kept on
    the device. Under data-parallel training each process takes its own contiguous part
    of the training rows.
    """

    name = "train"

    def __init__(self, X: Any, train_ind: Any = None, valid_ind: Any = None,
                 call_func: Callable | None = None, extra: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__()
        self.X, self.train_ind, self.valid_ind = X, train_ind, valid_ind
        self.call_func = call_func
        self.extra = dict(extra or {})
        self._inputs: dict[str, Any] | None = None

    def inputs(self) -> dict[str, Any]:
        """Every row of ``X`` on the device (gathered on first use)."""
        if self._inputs is None:
            X = self.X
            inputs = X[np.arange(len(X))] if hasattr(X, "subset") else as_inputs(X)
            self._inputs = self.plan.to_device(inputs)
        return self._inputs

    def rows(self, ind: Any) -> dict[str, Any]:
        """The inputs of rows ``ind`` (all rows when None), with the extra inputs."""
        inputs = self.inputs()
        n = len(inputs["x"])
        if ind is not None:
            pos = torch.from_numpy(_positions(ind, n)).to(self.plan.device)
            inputs = {k: v.index_select(0, pos) if torch.is_tensor(v) and v.dim() > 0
                      and len(v) == n else v for k, v in inputs.items()}
        return {**inputs, **self.extra}

    def bind(self, plan: Any, shard: Shard) -> None:
        super().bind(plan, shard)
        if self.call_func is None:
            plan.require("loss", "train")
        for part, ind in (("training rows", self.train_ind), ("validation rows", self.valid_ind)):
            if shard.world > 1 and ind is not None:
                ddp.check_same(part, np.asarray(ind, dtype=np.int64))

    def _own(self, ind: Any) -> Batch:
        n = len(self.inputs()["x"])
        pos = np.arange(n) if ind is None else _positions(ind, n)
        if self.shard.world > 1:
            pos = np.array_split(pos, self.shard.world)[self.shard.rank]
            if pos.size == 0:
                return Batch.empty()
            ind = pos
        inputs = self.rows(ind)
        return Batch(lambda: self.plan.loss(inputs, self.call_func), n_obs(inputs), pos)

    def batches(self) -> Iterator[Batch]:
        yield self._own(self.train_ind)

    def n_steps(self) -> int:
        return 1

    def validation_batches(self) -> Iterable[Batch] | None:
        return None if self.valid_ind is None else [self._own(self.valid_ind)]
