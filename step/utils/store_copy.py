"""Copying anndata elements (obs tables, sparse matrices) from an ``.h5ad`` file or a
``.zarr`` store into an ``.h5ad`` file without reading them into memory whole, and writing
an obs table from memory the way anndata writes one.

HDF5 sources are copied by HDF5 itself (``h5py.Group.copy``); zarr sources are
walked group by group and their arrays copied a slice of rows at a time, with their
anndata encoding attributes, so :func:`anndata.io.read_elem` reads the copy as it
reads the source.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pandas as pd

try:  # anndata >= 0.11
    from anndata.io import write_elem
except ImportError:  # pragma: no cover - older anndata
    from anndata.experimental import write_elem

__all__ = ["copy_element", "write_obs_frame"]

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


def _is_array(element: Any) -> bool:
    return hasattr(element, "shape") and hasattr(element, "dtype")


def _copy_array(array: Any, target: h5py.Group, name: str, step: int,
                rows: slice | None) -> None:
    string = _is_string(array.dtype)
    dtype = h5py.string_dtype() if string else array.dtype
    if array.ndim == 0:
        value = array[()]
        out = target.create_dataset(name, data=str(value) if string else value, dtype=dtype)
    else:
        first, last, _ = (rows or slice(None)).indices(int(array.shape[0]))
        n_rows = max(0, last - first)
        per_row = int(np.prod(array.shape[1:], dtype=np.int64)) or 1
        rows_per_copy = max(1, step // per_row)
        chunks = (max(1, min(n_rows, rows_per_copy)), *array.shape[1:]) if n_rows else None
        out = target.create_dataset(name, shape=(n_rows, *array.shape[1:]), dtype=dtype,
                                    chunks=chunks)
        for start in range(0, n_rows, rows_per_copy):
            stop = min(start + rows_per_copy, n_rows)
            block = np.asarray(array[first + start:first + stop])
            out[start:stop] = block.astype(object) if string else block
    _copy_attrs(array, out)


def copy_element(source: Any, target: h5py.Group, name: str, *, rows: slice | None = None,
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
    rows
        A slice of rows (step 1) to copy instead of all rows: of an array, or of every
        column and the index of a dataframe (categories are copied whole).
    step
        Elements copied per read (memory is about one slice).

    Raises
    ------
    ValueError
        If ``rows`` is given for an element that is not an array or a dataframe, or
        with a step other than 1.
    """
    if rows is not None and rows.step not in (None, 1):
        msg = f"rows must be a slice with step 1, received {rows}"
        raise ValueError(msg)
    if _is_array(source):
        _copy_array(source, target, name, step, rows)
        return
    encoding = source.attrs.get("encoding-type")
    if rows is not None and encoding != "dataframe":
        msg = f"rows can be selected in arrays and dataframes, not in a {encoding!r} element"
        raise ValueError(msg)
    if rows is None and isinstance(source, h5py.Group):
        source.file.copy(source, target, name)
        return
    out = target.create_group(name)
    _copy_attrs(source, out)
    for key in source.keys():
        child = source[key]
        if rows is None:
            copy_element(child, out, key, step=step)
        elif _is_array(child):
            _copy_array(child, out, key, step, rows)
        else:  # a column stored as a group: categorical or nullable
            part = out.create_group(key)
            _copy_attrs(child, part)
            categorical = child.attrs.get("encoding-type") == "categorical"
            for member in child.keys():
                whole = categorical and member == "categories"
                _copy_array(child[member], part, member, step, None if whole else rows)


def write_obs_frame(target: h5py.Group, name: str, obs: pd.DataFrame) -> None:
    """Write an obs table from memory as ``target[name]``, as ``AnnData.write_h5ad``
    writes one: the index as strings, and string columns with fewer distinct values than
    rows as categoricals.

    Parameters
    ----------
    target
        An open HDF5 group; ``name`` must not exist in it.
    name
        Name of the element written.
    obs
        The table (not modified).
    """
    import anndata as ad

    holder = ad.AnnData(obs=obs.set_axis(obs.index.astype(str)))
    holder.strings_to_categoricals()
    write_elem(target, name, holder.obs)
