"""Copying anndata elements (obs tables, sparse matrices) from an ``.h5ad`` file or a
``.zarr`` store into an ``.h5ad`` file without reading them into memory whole.

HDF5 sources are copied by HDF5 itself (:meth:`h5py.Group.copy`); zarr sources are
walked group by group and their arrays copied a slice of rows at a time, with their
anndata encoding attributes, so :func:`anndata.io.read_elem` reads the copy as it
reads the source.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

__all__ = ["copy_element"]

#: Elements (rows of a 1-d array) copied per read from a zarr store.
COPY_ELEMENTS = 1 << 22


def _is_string(dtype: Any) -> bool:
    return dtype.kind in "OTU" or type(dtype).__name__ == "StringDType"


def _h5_attr(value: Any) -> Any:
    """A zarr (JSON) attribute as HDF5 stores it: lists become arrays."""
    if not isinstance(value, list | tuple):
        return value
    if not value:
        return np.array([], dtype=np.float64)  # what anndata writes for an empty list
    if all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    return np.asarray(value)


def _copy_attrs(source: Any, target: h5py.Group | h5py.Dataset) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = _h5_attr(value)


def _copy_array(array: Any, target: h5py.Group, name: str, step: int) -> None:
    string = _is_string(array.dtype)
    dtype = h5py.string_dtype() if string else array.dtype
    if array.ndim == 0:
        value = array[()]
        out = target.create_dataset(name, data=str(value) if string else value, dtype=dtype)
    else:
        rows = int(array.shape[0])
        per_row = int(np.prod(array.shape[1:], dtype=np.int64)) or 1
        rows_per_copy = max(1, step // per_row)
        chunks = (max(1, min(rows, rows_per_copy)), *array.shape[1:]) if rows else None
        out = target.create_dataset(name, shape=array.shape, dtype=dtype, chunks=chunks)
        for start in range(0, rows, rows_per_copy):
            stop = min(start + rows_per_copy, rows)
            block = np.asarray(array[start:stop])
            out[start:stop] = block.astype(object) if string else block
    _copy_attrs(array, out)


def copy_element(source: Any, target: h5py.Group, name: str, *,
                 step: int = COPY_ELEMENTS) -> None:
    """Copy an anndata element (a group or an array) into ``target[name]``.

    Parameters
    ----------
    source
        An HDF5 or zarr group or array, e.g. ``store["obs"]`` or ``store["X"]``.
    target
        The HDF5 group to copy into; ``name`` must not exist in it yet.
    name
        Name of the copy.
    step
        Elements copied per read from a zarr store (memory is about one slice).
    """
    if isinstance(source, h5py.Group | h5py.Dataset):
        source.file.copy(source, target, name)
        return
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        _copy_array(source, target, name, step)
        return
    out = target.create_group(name)
    _copy_attrs(source, out)
    for key in source.keys():
        copy_element(source[key], out, key, step=step)
