"""Contiguous runs of row positions, and reading a backed sparse matrix run by run.

HDF5 and zarr read a contiguous slice of a CSR matrix in a few accesses, while a list
of rows costs accesses per row. Rows that come in runs (a spatial neighbourhood in a
store ordered along a space-filling curve, a block-shuffled batch) are therefore read
one slice per run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["contiguous_runs", "read_runs"]


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
        number of contiguous ranges a read of ``rows`` touches.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate([[0], breaks])]
    stops = rows[np.concatenate([breaks - 1, [rows.size - 1]])] + 1
    return np.stack([starts, stops], axis=1)


def _to_csr(block: Any) -> sp.csr_matrix:
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    return sp.csr_matrix(block, dtype=np.float32)


def read_runs(matrix: Any, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (increasing, distinct) of a backed CSR matrix as a float32 CSR matrix.

    Each run of consecutive rows is read as one slice. When the rows hardly form runs
    (more than half of them start a run), they are read in one indexed read instead,
    which costs the same number of accesses with less overhead.
    """
    runs = contiguous_runs(rows)
    if len(runs) == 1:
        return _to_csr(matrix[int(runs[0, 0]) : int(runs[0, 1])])
    if len(runs) == 0 or 2 * len(runs) > rows.size:
        return _to_csr(matrix[rows])
    parts = [_to_csr(matrix[int(a) : int(b)]) for a, b in runs]
    return sp.vstack(parts, format="csr", dtype=np.float32)
