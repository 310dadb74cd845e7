"""Synthetic sparse counts written to ``.h5ad`` and ``.zarr`` in row chunks, so that the
whole matrix is never held in memory (only one chunk and the obs table).

Each chunk of cells comes from :func:`step.datasets.synthetic_counts` with its own seed
(so its own cell-type profiles); the first chunk is written with anndata's
:func:`~anndata.io.write_elem`, and later chunks are appended by growing the CSR arrays
in place. anndata's ``sparse_dataset(...).append`` grows HDF5 files correctly but, with
this anndata and zarr v3, updates the ``shape`` of a zarr matrix without growing its
arrays, so both formats use the same small appender.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Elements per chunk of the stored CSR arrays (data, indices, indptr).
ARRAY_CHUNK = 1 << 16


def _open(path: Path) -> Any:
    if path.suffix == ".zarr":
        import zarr

        return zarr.open_group(str(path), mode="w")
    import h5py

    return h5py.File(path, "w")


def _append(group: Any, block: sp.csr_matrix) -> None:
    """Append the rows of ``block`` to the CSR group ``group`` (HDF5 or zarr)."""
    nnz = int(group["data"].shape[0])
    rows = int(group["indptr"].shape[0]) - 1
    for name, values in (("data", block.data), ("indices", block.indices)):
        array = group[name]
        array.resize((nnz + values.size,))
        array[nnz:] = values.astype(array.dtype, copy=False)
    indptr = group["indptr"]
    indptr.resize((rows + block.shape[0] + 1,))
    indptr[rows + 1:] = (block.indptr[1:] + nnz).astype(indptr.dtype)
    group.attrs["shape"] = [rows + block.shape[0], block.shape[1]]


def write_synthetic_stores(paths: list[Path], n_cells: int, n_genes: int, *, density: float,
                           seed: int, chunk_cells: int = 100_000) -> dict[str, Any]:
    """Write the same synthetic counts to every path (``.h5ad`` or ``.zarr``).

    Returns the number of non-zeros and the cell-type codes' categories.
    """
    from anndata.io import write_elem

    from step.datasets import synthetic_counts

    n_chunks = -(-n_cells // chunk_cells)
    stores = [_open(p) for p in paths]
    types: list[np.ndarray] = []
    nnz = 0
    options = {"chunks": (ARRAY_CHUNK,)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n_chunks):
            size = min(chunk_cells, n_cells - i * chunk_cells)
            part = synthetic_counts(size, n_genes, density=density, seed=seed * 100_003 + i)
            block = sp.csr_matrix(part.X, dtype=np.float32)
            block.indptr = block.indptr.astype(np.int64)
            types.append(part.obs["cell_type"].to_numpy().astype(str))
            nnz += int(block.nnz)
            for store in stores:
                if i == 0:
                    write_elem(store, "X", block, dataset_kwargs=options)
                    write_elem(store, "var", part.var)
                else:
                    _append(store["X"], block)
            del part, block
        obs = pd.DataFrame({"cell_type": pd.Categorical(np.concatenate(types))},
                           index=pd.Index([f"c{i}" for i in range(n_cells)]))
        for store, path in zip(stores, paths, strict=True):
            write_elem(store, "obs", obs)
            store.attrs["encoding-type"] = "anndata"
            store.attrs["encoding-version"] = "0.1.0"
            if path.suffix == ".zarr":
                import zarr

                zarr.consolidate_metadata(str(path))
            else:
                store.close()
    return {"nnz": nnz}


def store_bytes(path: Path) -> int:
    """Size on disk of a file or a store folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
