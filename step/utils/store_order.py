"""Write an AnnData store with its rows in a new order, a chunk of rows at a time.

Used to lay out a spatial store along :func:`step.graph.spatial_order` so that the
sub-graphs sampled for training read a few contiguous row ranges. The count matrices
(``X`` and sparse layers) are never loaded whole: each output chunk's rows are read
from the source in increasing order, put in the new order and appended to the output;
the row pointers of each matrix (``n_obs + 1`` integers) are held in memory.
The per-row annotations (obs, obsm, obsp) and the rest (var, varm, varp, uns) are read
into memory, as when a store is opened backed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from step.utils.row_runs import read_rows

try:  # anndata >= 0.11
    from anndata.io import read_elem, sparse_dataset, write_elem
except ImportError:  # pragma: no cover - older anndata
    from anndata.experimental import read_elem, sparse_dataset, write_elem

__all__ = ["write_in_order"]

PathLike = str | os.PathLike
_INT32_MAX = np.iinfo(np.int32).max


def _kind(path: Path) -> str:
    if path.suffix == ".zarr":
        return "zarr"
    if path.suffix in (".h5ad", ".h5"):
        return "h5ad"
    msg = f"{str(path)!r}: expected an .h5ad file or a .zarr store"
    raise ValueError(msg)


def _open(path: Path, mode: str) -> Any:
    if _kind(path) == "zarr":
        import zarr

        if mode == "w":
            return zarr.open_group(str(path), mode="w", zarr_format=ad.settings.zarr_write_format)
        return zarr.open(str(path), mode=mode)
    import h5py

    return h5py.File(path, mode)


def _check_order(order: Any, n: int) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim != 1 or order.size != n or not np.issubdtype(order.dtype, np.integer):
        msg = f"`order` must be a permutation of the {n} rows, got shape {order.shape} and dtype {order.dtype}"
        raise ValueError(msg)
    order = order.astype(np.int64)
    if order.min() < 0 or order.max() >= n or np.bincount(order, minlength=n).max() != 1:
        msg = f"`order` must hold every row position from 0 to {n - 1} exactly once"
        raise ValueError(msg)
    return order


def _matrices(store: Any) -> dict[str, Any]:
    """Row-aligned matrices to reorder in chunks: X and the layers, by element path."""
    names = ["X"] if "X" in store else []
    if "layers" in store:
        names += [f"layers/{k}" for k in store["layers"].keys()]
    out = {}
    for name in names:
        encoding = store[name].attrs.get("encoding-type", "dense array")
        if encoding != "csr_matrix":
            msg = (
                f"{name} is stored as {encoding!r}; writing in a new order by chunks needs CSR "
                "matrices (write it with scipy.sparse.csr_matrix) or an in-memory AnnData"
            )
            raise ValueError(msg)
        out[name] = sparse_dataset(store[name])
    return out


def _chunk(matrix: Any, indptr: np.ndarray, rows: np.ndarray, wide_index: bool) -> sp.csr_matrix:
    """Rows ``rows`` (any order, distinct) of a backed CSR matrix, in that order."""
    ascending = np.sort(rows)
    block = read_rows(matrix.group, indptr, ascending, matrix.shape[1])
    block = sp.csr_matrix(block[np.searchsorted(ascending, rows)], dtype=matrix.dtype)
    if wide_index:  # the whole matrix needs 64-bit positions: appending keeps the first dtype
        block.indices = block.indices.astype(np.int64)
        block.indptr = block.indptr.astype(np.int64)
    return block


def _skeleton(store: Any, order: np.ndarray) -> ad.AnnData:
    """Everything but the count matrices, rows already in the new order."""
    def elem(key: str) -> Any:
        return read_elem(store[key]) if key in store else {}

    obs = read_elem(store["obs"]).iloc[order]
    obsm = {k: np.asarray(v)[order] if not sp.issparse(v) else v[order] for k, v in elem("obsm").items()}
    obsp = {k: v[order][:, order] for k, v in elem("obsp").items()}
    return ad.AnnData(obs=obs, var=read_elem(store["var"]), uns=elem("uns"), obsm=obsm,
                      varm=elem("varm"), obsp=obsp, varp=elem("varp"))


def write_in_order(
    source: PathLike | ad.AnnData,
    dest: PathLike,
    order: Any,
    *,
    chunk_rows: int = 16384,
) -> Path:
    """Write ``source`` to ``dest`` with its rows in the order ``order``.

    Parameters
    ----------
    source
        Path of an ``.h5ad`` file or ``.zarr`` store (or an AnnData opened with
        ``backed="r"``), read a chunk of rows at a time. An in-memory AnnData is
        written as ``source[order]``.
    dest
        Path of the new ``.h5ad`` file or ``.zarr`` store; must not exist.
    order
        Permutation of the rows: row ``i`` of ``dest`` is row ``order[i]`` of
        ``source``, e.g. from :func:`step.graph.spatial_order`.
    chunk_rows
        Rows read and written at a time; bounds the memory used for the counts.

    Returns
    -------
    pathlib.Path
        The path of the written store.

    Raises
    ------
    FileExistsError
        If ``dest`` exists.
    ValueError
        If ``order`` is not a permutation of the rows, or a count matrix of an on-disk
        source is not stored as CSR.
    """
    dest = Path(dest)
    if dest.exists():
        msg = f"{str(dest)!r} exists; choose a new path"
        raise FileExistsError(msg)
    kind = _kind(dest)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        msg = f"`chunk_rows` must be a positive integer, got {chunk_rows!r}"
        raise ValueError(msg)
    if isinstance(source, ad.AnnData) and not source.isbacked:
        subset = source[_check_order(order, source.n_obs)].copy()
        subset.write_zarr(dest) if kind == "zarr" else subset.write_h5ad(dest)
        return dest

    path = Path(source.filename) if isinstance(source, ad.AnnData) else Path(source)
    store = _open(path, "r")
    try:
        n_obs = len(read_elem(store["obs"]))
        order = _check_order(order, n_obs)
        out = _open(dest, "w")
        try:
            write_elem(out, "/", _skeleton(store, order))
            for name, matrix in _matrices(store).items():
                indptr = np.asarray(matrix.group["indptr"][:], dtype=np.int64)
                wide = int(indptr[-1]) > _INT32_MAX
                for start in range(0, n_obs, chunk_rows):
                    block = _chunk(matrix, indptr, order[start : start + chunk_rows], wide)
                    if start == 0:
                        write_elem(out, name, block)
                    else:
                        sparse_dataset(out[name]).append(block)
        finally:
            if kind == "h5ad":
                out.close()
        if kind == "zarr":
            import zarr

            zarr.consolidate_metadata(str(dest))
    finally:
        if _kind(path) == "h5ad":
            store.close()
    return dest
