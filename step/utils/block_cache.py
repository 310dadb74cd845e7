"""Rows of an on-disk matrix read in aligned blocks, with the recent blocks kept in memory.

A block-shuffled epoch (:class:`step.utils.block_sampler.BlockBatchSampler`) shuffles
the rows of several blocks together, so each batch takes a few rows from each of them
and the next batches come back to the same blocks. Reading only the requested rows
then reads (and, in zarr, decompresses) the same stored chunks once per batch. A
:class:`RowBlockCache` reads every block it is asked for whole, once, and serves the
following batches from memory; a block leaves the cache when it is the least recently
used of more than ``max_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

__all__ = ["RowBlockCache"]

Reader = Callable[[np.ndarray], sp.csr_matrix]


class RowBlockCache:
    """Aligned blocks of rows of one matrix, read whole and kept while recently used.

    Parameters
    ----------
    n_rows
        Rows of the matrix.
    block_rows
        Rows per block; block ``b`` holds rows ``[b * block_rows, (b + 1) * block_rows)``.
    max_blocks
        Blocks kept in memory (at least the blocks of one request are always read).

    Notes
    -----
    Memory is about ``max_blocks * block_rows`` rows of stored values. The rows
    returned are exactly those the reader returns for them, so results do not depend
    on whether a block came from the cache.
    """

    def __init__(self, n_rows: int, block_rows: int, max_blocks: int) -> None:
        for value, name in ((block_rows, "block_rows"), (max_blocks, "max_blocks")):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                msg = f"{name} must be a positive integer, received {value!r}"
                raise ValueError(msg)
        self.n_rows = int(n_rows)
        self.block_rows = int(block_rows)
        self.max_blocks = int(max_blocks)
        self._blocks: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self.blocks_read = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()

    def _bounds(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def rows(self, rows: np.ndarray, read: Reader) -> sp.csr_matrix:
        """The matrix's ``rows`` (increasing, distinct), reading missing blocks with ``read``.

        Parameters
        ----------
        rows
            Increasing distinct row positions.
        read
            Returns the CSR rows of a given increasing array of positions.

        Returns
        -------
        scipy.sparse.csr_matrix
            One row per entry of ``rows``, in that order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        ids = np.unique(rows // self.block_rows)
        found = {int(b): self._blocks.get(int(b)) for b in ids}
        missing = [b for b, block in found.items() if block is None]
        if missing:
            wanted = np.concatenate([np.arange(*self._bounds(b), dtype=np.int64) for b in missing])
            block = read(wanted)
            edges = np.cumsum([0] + [np.subtract(*self._bounds(b)[::-1]) for b in missing])
            for b, lo, hi in zip(missing, edges[:-1], edges[1:], strict=True):
                found[b] = block[int(lo):int(hi)]
            self.blocks_read += len(missing)
        for b in found:
            self._blocks[b] = found[b]
            self._blocks.move_to_end(b)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        parts = [found[int(b)] for b in ids]
        stacked = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        first = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])[:-1]])
        local = first[np.searchsorted(ids, rows // self.block_rows)] + rows % self.block_rows
        if local.size == stacked.shape[0]:
            return stacked
        return stacked[local]
