"""Input checks shared by the datasets and the preprocessing helpers.

Every check only reads its input: nothing here writes into an AnnData object.
Problems with values raise :class:`ValueError`; missing keys raise :class:`KeyError`
naming the key and listing the ones that exist; wrong types raise :class:`TypeError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

__all__ = [
    "check_adata",
    "check_batch_size",
    "check_counts",
    "check_in_memory",
    "check_not_empty",
    "check_obs_key",
    "check_obsm_key",
    "check_unique_names",
    "get_counts",
]

# Number of stored values checked at once, to bound temporary memory on huge matrices.
_CHUNK = 1 << 23


def _listing(names: Iterable[Any]) -> str:
    names = [str(n) for n in names]
    if not names:
        return "none"
    if len(names) > 20:
        return ", ".join(repr(n) for n in names[:20]) + f", ... ({len(names)} in all)"
    return ", ".join(repr(n) for n in names)


def check_adata(adata: Any) -> ad.AnnData:
    """Check that ``adata`` is an AnnData object and return it.

    Parameters
    ----------
    adata
        The object to check.

    Returns
    -------
    The same object.

    Raises
    ------
    TypeError
        If ``adata`` is not an :class:`anndata.AnnData`.
    """
    if not isinstance(adata, ad.AnnData):
        msg = f"expected an AnnData object, received {type(adata).__name__}"
        raise TypeError(msg)
    return adata


def check_in_memory(adata: ad.AnnData) -> None:
    """Raise if ``adata`` is backed by a file (``read_h5ad(..., backed="r")``).

    Raises
    ------
    ValueError
        If ``adata.isbacked``; the message says how to load the data into memory.
    """
    check_adata(adata)
    if adata.isbacked:
        msg = (
            f"the AnnData object is backed by the file {str(adata.filename)!r}; backed data is "
            "not supported here (only scModel trains from a backed file, see "
            "step.utils.ondisk.OnDiskDataset). Load it into memory with adata.to_memory() or "
            "anndata.read_h5ad(path) without backed="
        )
        raise ValueError(msg)


def check_unique_names(adata: ad.AnnData, *, axis: str = "var") -> None:
    """Raise if ``adata`` has duplicate gene (``axis="var"``) or cell (``"obs"``) names.

    Raises
    ------
    ValueError
        If some names occur more than once; the message lists them and suggests
        ``adata.var_names_make_unique()`` (or ``obs_names_make_unique()``).
    """
    check_adata(adata)
    if axis not in ("var", "obs"):
        msg = f"axis must be 'var' or 'obs', received {axis!r}"
        raise ValueError(msg)
    names = adata.var_names if axis == "var" else adata.obs_names
    if names.is_unique:
        return
    duplicated = names[names.duplicated()].unique()
    what = "gene" if axis == "var" else "cell"
    msg = (
        f"adata.{axis}_names holds {len(duplicated)} duplicated {what} names "
        f"({_listing(duplicated)}); every {what} needs its own name. Call "
        f"adata.{axis}_names_make_unique() first"
    )
    raise ValueError(msg)


def check_not_empty(adata: ad.AnnData) -> None:
    """Raise if ``adata`` has no cells or no genes.

    Raises
    ------
    ValueError
        If ``adata.n_obs == 0`` or ``adata.n_vars == 0``.
    """
    check_adata(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = (
            f"the AnnData object is empty ({adata.n_obs} cells x {adata.n_vars} genes); "
            "at least one cell and one gene are needed"
        )
        raise ValueError(msg)


def get_counts(adata: ad.AnnData, layer: str | None = None) -> Any:
    """Return the count matrix stored in ``adata.layers[layer]`` or in ``adata.X``.

    The matrix is returned as stored (no copy, no conversion).

    Parameters
    ----------
    adata
        Annotated data matrix.
    layer
        Name of a layer; ``None`` selects ``adata.X``.

    Raises
    ------
    KeyError
        If ``layer`` is not one of ``adata.layers``.
    ValueError
        If ``layer`` is ``None`` and ``adata.X`` is empty (``None``).
    """
    check_adata(adata)
    if layer is None:
        if adata.X is None:
            msg = (
                "adata.X is None; pass `layer` to read counts from one of the layers "
                f"({_listing(adata.layers.keys())})"
            )
            raise ValueError(msg)
        return adata.X
    if not isinstance(layer, str):
        msg = f"`layer` must be a string or None, received {type(layer).__name__}"
        raise TypeError(msg)
    if layer not in adata.layers:
        msg = f"layer {layer!r} not found in adata.layers; available layers: {_listing(adata.layers.keys())}"
        raise KeyError(msg)
    return adata.layers[layer]


def check_obs_key(adata: ad.AnnData, key: str, *, role: str = "key") -> None:
    """Raise if ``key`` is not a column of ``adata.obs``.

    Parameters
    ----------
    adata
        Annotated data matrix.
    key
        Column name to look up.
    role
        Name of the argument that supplied ``key`` (used in the message), e.g. ``"batch_key"``.

    Raises
    ------
    KeyError
        If the column does not exist; the message lists the available columns.
    """
    check_adata(adata)
    if key not in adata.obs.columns:
        msg = f"{role} {key!r} not found in adata.obs; available columns: {_listing(adata.obs.columns)}"
        raise KeyError(msg)


def check_obsm_key(adata: ad.AnnData, key: str, *, role: str = "key") -> None:
    """Raise if ``key`` is not an entry of ``adata.obsm``.

    Raises
    ------
    KeyError
        If the entry does not exist; the message lists the available entries.
    """
    check_adata(adata)
    if key not in adata.obsm:
        msg = f"{role} {key!r} not found in adata.obsm; available entries: {_listing(adata.obsm.keys())}"
        raise KeyError(msg)


def check_batch_size(batch_size: Any) -> int:
    """Check a mini-batch size and return it as ``int``.

    Raises
    ------
    TypeError
        If ``batch_size`` is not an integer.
    ValueError
        If ``batch_size < 1``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        msg = f"batch_size must be a positive integer, received {batch_size!r} ({type(batch_size).__name__})"
        raise TypeError(msg)
    if batch_size < 1:
        msg = f"batch_size must be a positive integer, received {batch_size}"
        raise ValueError(msg)
    return int(batch_size)


def _position(matrix: Any, flat: int) -> tuple[int, int]:
    """Row and column of the ``flat``-th stored value of ``matrix``."""
    if sp.issparse(matrix):
        major = int(np.searchsorted(matrix.indptr, flat, side="right") - 1)
        minor = int(matrix.indices[flat])
        if matrix.format == "csc":
            return minor, major
        return major, minor
    row, col = np.unravel_index(flat, matrix.shape)
    return int(row), int(col)


def check_counts(matrix: Any, *, name: str = "X") -> None:
    """Check that ``matrix`` holds count data: finite, non-negative whole numbers.

    Sparse matrices are checked on their stored values only, in chunks, so the
    check never densifies the matrix.

    Parameters
    ----------
    matrix
        Dense array or scipy sparse matrix.
    name
        What the matrix is called in messages, e.g. ``"X"`` or ``"layers['counts']"``.

    Raises
    ------
    ValueError
        If there are NaN or infinite, negative or non-integer entries; the message
        gives how many and the position and value of the first one.
    TypeError
        If the values are not numeric.
    """
    if sp.issparse(matrix):
        if matrix.format not in ("csr", "csc"):
            matrix = matrix.tocsr()
        values = np.asarray(matrix.data)
    else:
        values = np.asarray(matrix).reshape(-1)
        matrix = np.asarray(matrix)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        msg = f"{name} must hold numeric counts, received dtype {values.dtype}"
        raise TypeError(msg)
    if np.issubdtype(values.dtype, np.complexfloating):
        msg = f"{name} must hold real-valued counts, received dtype {values.dtype}"
        raise TypeError(msg)
    is_float = np.issubdtype(values.dtype, np.floating)

    problems = {"non-finite": [0, None], "negative": [0, None], "non-integer": [0, None]}
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        masks = {}
        if is_float:
            finite = np.isfinite(chunk)
            masks["non-finite"] = ~finite
            masks["negative"] = finite & (chunk < 0)
            masks["non-integer"] = finite & (chunk != np.round(chunk))
        else:
            masks["negative"] = chunk < 0
        for kind, mask in masks.items():
            n_bad = int(np.count_nonzero(mask))
            if n_bad:
                problems[kind][0] += n_bad
                if problems[kind][1] is None:
                    problems[kind][1] = start + int(np.argmax(mask))

    for kind, (n_bad, first) in problems.items():
        if not n_bad:
            continue
        row, col = _position(matrix, first)
        example = f"e.g. {values[first]!r} at cell {row}, gene {col}"
        if kind == "non-finite":
            msg = f"{name} holds {n_bad} NaN or infinite entries ({example}); counts must be finite"
        elif kind == "negative":
            msg = f"{name} holds {n_bad} negative entries ({example}); counts must be >= 0"
        else:
            msg = (
                f"{name} holds {n_bad} non-integer entries ({example}); the count likelihoods "
                "need raw integer counts, not normalised or log-transformed values "
                "(pass `layer=` to read counts from a layer)"
            )
        raise ValueError(msg)
