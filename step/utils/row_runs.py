"""Contiguous runs of row positions, and reading the rows of an on-disk CSR matrix by runs.

HDF5 and zarr read a contiguous slice of an array in one access, and the cost of an
access hardly depends on its length at these sizes, while anndata's reader of a list
of rows makes accesses per row. :func:`read_rows` therefore turns the requested rows
into their runs of consecutive rows, the runs into ranges of stored values (through
the row pointers, kept in memory), merges ranges separated by small gaps, and reads
each merged range of ``data`` and ``indices`` once. Rows that come in runs (a spatial
neighbourhood in a store ordered along a space-filling curve, a block-shuffled batch)
thus cost a few accesses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["contiguous_runs", "read_rows"]

#: Stored values that may be read and discarded to join two ranges into one access.
MAX_GAP = 16384


def contiguous_runs(rows: Any) -> np.ndarray:
    """Maximal runs of consecutive values in increasing, distinct ``rows``.

    Parameters
    ----------
    rows
        Increasing distinct integer positions.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(k, 2)`` of ``[start, stop)`` per run, in order; ``k`` is the
        number of contiguous row ranges a read of ``rows`` touches.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate([[0], breaks])]
    stops = rows[np.concatenate([breaks - 1, [rows.size - 1]])] + 1
    return np.stack([starts, stops], axis=1)


def _read_ranges(array: Any, starts: np.ndarray, stops: np.ndarray, max_gap: int) -> np.ndarray:
    """Values ``[starts[i], stops[i])`` of a 1-d on-disk array (ranges increasing, disjoint),
    concatenated; ranges closer than ``max_gap`` are read as one."""
    lengths = stops - starts
    if starts.size == 1:
        return np.asarray(array[int(starts[0]) : int(stops[0])])
    joined = np.flatnonzero(starts[1:] - stops[:-1] > max_gap) + 1
    lo = starts[np.concatenate([[0], joined])]
    hi = stops[np.concatenate([joined - 1, [starts.size - 1]])]
    if hasattr(array, "oindex"):  # zarr: one call fetches (and decodes) all chunks together
        buffer = np.asarray(array.oindex[np.concatenate(
            [np.arange(a, b, dtype=np.int64) for a, b in zip(lo, hi, strict=True)])])
    else:
        buffer = np.concatenate([np.asarray(array[int(a) : int(b)])
                                 for a, b in zip(lo, hi, strict=True)])
    if lo.size == starts.size:
        return buffer
    block = np.searchsorted(lo, starts, side="right") - 1
    offset = np.concatenate([[0], np.cumsum(hi - lo)[:-1]])
    first = offset[block] + (starts - lo[block])
    before = np.cumsum(lengths) - lengths
    return buffer[np.repeat(first - before, lengths) + np.arange(int(lengths.sum()))]


def read_rows(
    group: Any,
    indptr: np.ndarray,
    rows: np.ndarray,
    n_cols: int,
    *,
    max_gap: int = MAX_GAP,
) -> sp.csr_matrix:
    """Rows of an on-disk CSR matrix as a float32 CSR matrix, read a run at a time.

    Parameters
    ----------
    group
        The matrix's HDF5 or zarr group (arrays ``data`` and ``indices``).
    indptr
        Its row pointers, in memory (``n_rows + 1`` integers).
    rows
        Increasing distinct row positions.
    n_cols
        Number of columns.
    max_gap
        Ranges of stored values separated by at most this many values are read in one
        access (the values in between are discarded).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``len(rows) x n_cols``, float32, rows in the order of ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    counts = indptr[rows + 1] - indptr[rows]
    out_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    runs = contiguous_runs(rows)
    starts, stops = indptr[runs[:, 0]].astype(np.int64), indptr[runs[:, 1]].astype(np.int64)
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if starts.size == 0:
        return sp.csr_matrix((rows.size, n_cols), dtype=np.float32)
    data = _read_ranges(group["data"], starts, stops, max_gap).astype(np.float32, copy=False)
    indices = _read_ranges(group["indices"], starts, stops, max_gap)
    return sp.csr_matrix((data, indices, out_indptr), shape=(rows.size, n_cols))
