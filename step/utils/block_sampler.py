"""Batch samplers of positions: plain shuffling, and block shuffling, whose random
mini-batches read few contiguous ranges of rows.

Reading the rows of a random batch from an on-disk sparse matrix (HDF5 or zarr)
costs one chunk access per row, and chunk accesses dominate the time. Block
shuffling trades a little randomness for contiguity: the rows are cut into
contiguous blocks of ``block_size`` rows, the blocks are visited in random order,
and the rows of ``buffer_blocks`` consecutive blocks are shuffled together before
they are cut into batches. A batch then touches at most ``buffer_blocks`` (plus
one, at buffer edges) contiguous ranges, while every row is still seen exactly
once per epoch.

The ``scdataset`` package (PyPI) implements the same idea as a
``torch.utils.data.IterableDataset`` that drives its own iteration with a NumPy
generator. It does not fit the index-loader protocol the Trainer relies on (a
sampler of position arrays over a dataset with ``subset`` views, a
``torch.Generator`` reseeded per epoch, batches dealt round-robin between
data-parallel processes), so the sampler below is a plain
:class:`torch.utils.data.Sampler` with the interface of
:class:`step.utils.dataset.IndexBatchSampler`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from step.utils.validation import check_batch_size

__all__ = ["BlockBatchSampler"]


def _check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        msg = f"{name} must be a positive integer, received {value!r}"
        raise ValueError(msg)
    return int(value)


class IndexBatchSampler(Sampler[np.ndarray]):
    """Yields batches of positions (int64 arrays), reshuffled every epoch.

    Parameters
    ----------
    n
        Number of items.
    batch_size
        Items per batch.
    shuffle
        Draw a new random permutation each epoch; otherwise go in order.
    drop_last
        Drop the final batch when it is smaller than ``batch_size``.
    seed
        Seed of the sampler's own :class:`torch.Generator`. ``None`` seeds it from
        torch's global generator, so :func:`torch.manual_seed` makes it reproducible.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        self.n = int(n)
        self.batch_size = check_batch_size(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = torch.Generator()
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.generator.manual_seed(int(seed))

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def order(self) -> np.ndarray:
        """One epoch's order of all positions (draws from ``generator``)."""
        if self.shuffle:
            return torch.randperm(self.n, generator=self.generator).numpy()
        return np.arange(self.n, dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.order()
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, self.n), self.batch_size):
            yield order[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """State of the sampler's generator (for checkpoints)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


class BlockBatchSampler(IndexBatchSampler):
    """Yields batches of positions drawn by block shuffling.

    Parameters
    ----------
    n
        Number of items.
    batch_size
        Items per batch.
    block_size
        Rows per contiguous block.
    buffer_blocks
        Blocks whose rows are shuffled together; larger buffers are more random
        and read more ranges per batch.
    shuffle
        Shuffle blocks and rows every epoch; otherwise go in order.
    drop_last
        Drop the final batch when it is smaller than ``batch_size``.
    seed
        Seed of the sampler's own :class:`torch.Generator`. ``None`` seeds it from
        torch's global generator.

    Notes
    -----
    Like :class:`~step.utils.dataset.IndexBatchSampler`, each iteration draws from
    ``generator``, which the Trainer reseeds every epoch, so an epoch's order
    depends only on that seed.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        block_size: int = 64,
        buffer_blocks: int = 16,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        self.block_size = _check_positive(block_size, "block_size")
        self.buffer_blocks = _check_positive(buffer_blocks, "buffer_blocks")
        super().__init__(n, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)

    def _buffers(self) -> Iterator[np.ndarray]:
        """The shuffled rows of each buffer in turn (draws from ``generator``)."""
        n_blocks = -(-self.n // self.block_size)
        blocks = torch.randperm(n_blocks, generator=self.generator).numpy()
        for start in range(0, n_blocks, self.buffer_blocks):
            rows = np.concatenate(
                [
                    np.arange(b * self.block_size, min((b + 1) * self.block_size, self.n), dtype=np.int64)
                    for b in blocks[start : start + self.buffer_blocks]
                ]
            )
            perm = torch.randperm(rows.size, generator=self.generator).numpy()
            yield rows[perm]

    def order(self) -> np.ndarray:
        """One epoch's order of all positions (draws from ``generator``)."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.concatenate(list(self._buffers()))

    def __iter__(self) -> Iterator[np.ndarray]:
        # The batches of order(), cut buffer by buffer: an epoch over many millions of
        # rows never holds its whole order in memory.
        if not self.shuffle:
            yield from super().__iter__()
            return
        remaining = len(self) * self.batch_size
        carry = np.empty(0, dtype=np.int64)
        for rows in self._buffers():
            pending = np.concatenate([carry, rows]) if carry.size else rows
            full = pending.size - pending.size % self.batch_size
            for start in range(0, full, self.batch_size):
                if remaining <= 0:
                    return
                yield pending[start : start + self.batch_size]
                remaining -= self.batch_size
            carry = pending[full:]
        if carry.size and remaining > 0:
            yield carry
