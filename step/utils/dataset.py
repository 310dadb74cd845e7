"""Torch datasets over AnnData count matrices.

A dataset keeps the counts as a ``scipy.sparse.csr_matrix`` (float32) and gathers
mini-batches by index: ``dataset[idx]`` slices the CSR rows of ``idx`` and densifies
only those rows. The mode of a dataset decides which entries an item holds:

======== =================================================
mode     keys of an item (see :data:`step._constants.ITEM_KEYS`)
======== =================================================
expr     x, library, index
batch    x, library, index, batch
class    x, library, index, batch, label
spatial  x, library, index, batch, spatial
======== =================================================

``subset`` returns a :class:`MaskedDataset` view that shares the parent's data and
owns its own mode; views of views compose. :func:`index_loader` wraps a dataset in a
:class:`torch.utils.data.DataLoader` whose sampler yields whole index batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from step._constants import ITEM_KEYS, MODES
from step.utils.block_sampler import BlockBatchSampler, IndexBatchSampler
from step.utils.row_runs import contiguous_runs
from step.utils.store_copy import write_obs_frame
from step.utils.validation import (
    check_adata,
    check_batch_size,
    check_counts,
    check_not_empty,
    check_obs_key,
    check_obsm_key,
    get_counts,
)

__all__ = [
    "BaseDataset",
    "IndexBatchSampler",
    "MaskedDataset",
    "ScDataset",
    "StDataset",
    "index_loader",
]

#: Extra item keys (beyond x, library and index) that each mode adds.
_MODE_EXTRAS: dict[str, tuple[str, ...]] = {
    MODES.EXPR: (),
    MODES.BATCH: (ITEM_KEYS.BATCH,),
    MODES.CLASS: (ITEM_KEYS.BATCH, ITEM_KEYS.LABEL),
    MODES.SPATIAL: (ITEM_KEYS.BATCH, ITEM_KEYS.SPATIAL),
}

IndexLike = int | np.integer | slice | Sequence[int] | np.ndarray | torch.Tensor


def _to_csr32(matrix: Any) -> sp.csr_matrix:
    """Counts as a float32 CSR matrix, copying only when the input is not one already."""
    if sp.issparse(matrix):
        if matrix.format != "csr":
            matrix = matrix.tocsr()
        out = sp.csr_matrix(matrix, dtype=np.float32)
    else:
        out = sp.csr_matrix(np.asarray(matrix), dtype=np.float32)
    return _one_index_dtype(out)


def _one_index_dtype(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """``matrix`` with ``indptr`` and ``indices`` of one integer type (int32 when it fits).

    Files written by anndata often pair int64 row pointers with int32 column indices;
    scipy then converts both whole arrays to a common type on every row selection, which
    makes each mini-batch cost time proportional to all the stored values.
    """
    limit = np.iinfo(np.int32).max
    dtype = np.int32 if matrix.nnz < limit and max(matrix.shape) < limit else np.int64
    if matrix.indptr.dtype == dtype and matrix.indices.dtype == dtype:
        return matrix
    return sp.csr_matrix((matrix.data, matrix.indices.astype(dtype, copy=False),
                          matrix.indptr.astype(dtype, copy=False)), shape=matrix.shape, copy=False)


def _encode(column: pd.Series, key: str, role: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and category names of an obs column, keeping categorical order."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        cat = column.array
    else:
        cat = pd.Categorical(column.to_numpy())
    codes = np.asarray(cat.codes, dtype=np.int64)
    missing = int(np.count_nonzero(codes < 0))
    if missing:
        msg = f"{role} {key!r} has {missing} missing values; every cell needs a {role.split('_')[0]} label"
        raise ValueError(msg)
    categories = [str(c) for c in cat.categories]
    return codes, categories


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class BaseDataset(Dataset):
    """A torch dataset over the counts of an AnnData object.

    Parameters
    ----------
    adata
        Annotated data matrix with raw integer counts (cells x genes).
    layer
        Layer holding the counts; ``None`` reads ``adata.X``.
    batch_key
        Column of ``adata.obs`` with batch labels; all cells are batch 0 when ``None``.
    class_key
        Column of ``adata.obs`` with class labels (needed by the ``"class"`` mode).
    spatial_key
        Entry of ``adata.obsm`` with coordinates (first two columns are used). Read when
        present; the ``"spatial"`` mode needs it. ``None`` skips coordinates.
    mode
        Initial mode, one of ``"expr"``, ``"batch"``, ``"class"``, ``"spatial"``.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData object.
    KeyError
        If ``layer``, ``batch_key`` or ``class_key`` does not exist.
    ValueError
        If the data are empty, are not counts, labels are missing, or ``mode`` is not usable.

    Notes
    -----
    The counts are stored once as a float32 ``scipy.sparse.csr_matrix`` (shared, not
    copied, when ``adata`` already holds one) and are never densified as a whole.
    ``dataset[i]`` returns a dict of tensors for one cell (``x`` of shape ``(n_genes,)``);
    ``dataset[idx]`` with a sequence, array, slice or tensor of positions returns a dict
    of batched tensors: ``x`` float32 ``(n, n_genes)``, ``library`` float32 ``(n,)``,
    ``batch``/``label`` int64 ``(n,)``, ``spatial`` float32 ``(n, 2)`` and ``index``
    int64 ``(n,)``, the positions within this dataset.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        class_key: str | None = None,
        spatial_key: str | None = "spatial",
        mode: str = MODES.EXPR,
    ) -> None:
        check_adata(adata)
        check_not_empty(adata)
        counts = get_counts(adata, layer)
        if batch_key is not None:
            check_obs_key(adata, batch_key, role="batch_key")
        if class_key is not None:
            check_obs_key(adata, class_key, role="class_key")
        check_counts(counts, name="X" if layer is None else f"layers[{layer!r}]")

        self._X = _to_csr32(counts)
        self._n_obs, self._n_genes = self._X.shape
        self._layer = layer
        self._var_names = adata.var_names.copy()
        self._obs_names = adata.obs_names.copy()
        self._obs = adata.obs.copy()
        ones = np.ones(self._n_genes, dtype=np.float64)
        self._library = _read_only(np.asarray(self._X @ ones, dtype=np.float32).reshape(-1))
        self._warn_empty_cells()
        self._init_annotations(adata, batch_key=batch_key, class_key=class_key, spatial_key=spatial_key, mode=mode)

    def _warn_empty_cells(self) -> None:
        """Warn when some cells have no counts (needs ``_library`` and ``_n_obs``)."""
        n_empty = int(np.count_nonzero(self._library == 0))
        if n_empty:
            warnings.warn(
                f"{n_empty} of {self._n_obs} cells have no counts; consider removing them "
                "(e.g. scanpy.pp.filter_cells(adata, min_counts=1))",
                UserWarning,
                stacklevel=3,
            )

    def _init_annotations(
        self,
        adata: ad.AnnData,
        *,
        batch_key: str | None,
        class_key: str | None,
        spatial_key: str | None,
        mode: str,
    ) -> None:
        """Encode batch and class labels and coordinates of ``adata``, then set the mode."""
        self._batch_key = batch_key
        if batch_key is None:
            self._batch_codes = np.zeros(self._n_obs, dtype=np.int64)
            self._batch_categories = ["0"]
        else:
            self._batch_codes, self._batch_categories = _encode(adata.obs[batch_key], batch_key, "batch_key")
        _read_only(self._batch_codes)

        self._class_key = class_key
        self._class_codes: np.ndarray | None = None
        self._class_categories: list[str] | None = None
        if class_key is not None:
            self._class_codes, self._class_categories = _encode(adata.obs[class_key], class_key, "class_key")
            _read_only(self._class_codes)

        self._spatial_key = spatial_key
        self._spatial: np.ndarray | None = None
        if spatial_key is not None and spatial_key in adata.obsm:
            self._spatial = _read_only(self._read_spatial(adata, spatial_key))

        self._indices_cache: np.ndarray | None = None
        self._mode = MODES.EXPR
        self.set_mode(mode)

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _read_spatial(adata: ad.AnnData, key: str) -> np.ndarray:
        coords = np.asarray(adata.obsm[key])
        if coords.ndim != 2 or coords.shape[1] < 2:
            msg = f"adata.obsm[{key!r}] must have shape (n_cells, >=2), received {coords.shape}"
            raise ValueError(msg)
        if not np.issubdtype(coords.dtype, np.number):
            msg = f"adata.obsm[{key!r}] must be numeric, received dtype {coords.dtype}"
            raise TypeError(msg)
        coords = np.ascontiguousarray(coords[:, :2], dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(coords).all(axis=1)))
        if bad:
            msg = f"adata.obsm[{key!r}] has {bad} cells with NaN or infinite coordinates"
            raise ValueError(msg)
        return coords

    @property
    def root(self) -> BaseDataset:
        """The dataset that owns the data (``self`` unless this is a view)."""
        return self

    @property
    def indices(self) -> np.ndarray:
        """Positions of this dataset's items in :attr:`root` (int64, read-only)."""
        if self._indices_cache is None:
            self._indices_cache = _read_only(np.arange(self._n_obs, dtype=np.int64))
        return self._indices_cache

    def _root_rows(self, positions: np.ndarray) -> np.ndarray:
        """Map positions in this dataset to rows of the root matrix."""
        return positions

    def _csr_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows of the root matrix as a float32 CSR matrix (root datasets only)."""
        return self._X[rows]

    def _dense_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the root matrix as a dense float32 array (root datasets only)."""
        return self._X[rows].toarray()

    def __len__(self) -> int:
        return self._n_obs

    def __repr__(self) -> str:
        root = self.root
        parts = [
            f"n_obs={len(self)}",
            f"n_genes={root.n_genes}",
            f"mode={self.mode!r}",
            f"n_batches={root.n_batches}",
        ]
        if root.n_classes:
            parts.append(f"n_classes={root.n_classes}")
        if root._spatial is not None:
            parts.append("spatial=True")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        """Current mode: which keys an item holds."""
        return self._mode

    @property
    def available_modes(self) -> tuple[str, ...]:
        """Modes whose data this dataset has."""
        return tuple(m for m in MODES if self.root._mode_problem(m) is None)

    def _mode_problem(self, mode: str) -> str | None:
        if mode not in _MODE_EXTRAS:
            return f"unknown mode {mode!r}; choose one of {list(MODES)}"
        if mode == MODES.CLASS and self._class_codes is None:
            return "mode 'class' needs class labels; build the dataset with class_key=<obs column>"
        if mode == MODES.SPATIAL and self._spatial is None:
            if self._spatial_key is None:
                return "mode 'spatial' needs coordinates; build the dataset with spatial_key=<obsm entry>"
            return f"mode 'spatial' needs coordinates, but adata.obsm has no {self._spatial_key!r} entry"
        return None

    def set_mode(self, mode: str) -> str:
        """Set the mode and return the previous one.

        Parameters
        ----------
        mode
            One of ``"expr"``, ``"batch"``, ``"class"``, ``"spatial"``.

        Returns
        -------
        The mode that was set before.

        Raises
        ------
        ValueError
            If ``mode`` is unknown or its data are missing.
        """
        problem = self.root._mode_problem(mode)
        if problem is not None:
            raise ValueError(problem)
        previous, self._mode = self._mode, mode
        return previous

    @property
    def item_keys(self) -> tuple[str, ...]:
        """Keys of the dicts returned in the current mode."""
        return (ITEM_KEYS.X, ITEM_KEYS.LIBRARY, ITEM_KEYS.INDEX, *_MODE_EXTRAS[self._mode])

    # ------------------------------------------------------------------ metadata
    @property
    def n_genes(self) -> int:
        """Number of genes (columns)."""
        return self.root._n_genes

    @property
    def var_names(self) -> pd.Index:
        """Gene names."""
        return self.root._var_names

    def _all_obs_names(self) -> pd.Index:
        """Cell names of every item of the root (root datasets only)."""
        return self._obs_names

    def _all_obs(self) -> pd.DataFrame:
        """obs of every item of the root, not to be modified (root datasets only)."""
        return self._obs

    @property
    def obs_names(self) -> pd.Index:
        """Cell names of this dataset's items."""
        root = self.root
        names = root._all_obs_names()
        return names if root is self else names[self.indices]

    def _write_root_obs(self, target: Any, name: str, rows: slice) -> None:
        """Write obs rows ``rows`` of the root as ``target[name]`` (root datasets only)."""
        write_obs_frame(target, name, self._all_obs().iloc[rows])

    def write_obs(self, target: Any, name: str = "obs", *, rows: slice | None = None) -> None:
        """Write the obs of this dataset's items into the HDF5 group ``target`` as ``target[name]``.

        Items that are consecutive cells of the root (the whole root, or a view of one
        run of its cells) are written by the root, which for
        :class:`~step.utils.ondisk.OnDiskDataset` copies them from store to store without
        reading the whole obs into memory. Other views write their obs rows from memory.

        Parameters
        ----------
        target
            An open HDF5 group (e.g. an ``h5py.File``); ``name`` must not exist in it.
        name
            Name of the element written.
        rows
            A slice of consecutive items of this dataset (step 1) to write instead of all.
        """
        if rows is None:
            rows = slice(None)
        elif not isinstance(rows, slice) or rows.step not in (None, 1):
            msg = f"rows must be a slice with step 1, got {rows!r}"
            raise ValueError(msg)
        start, stop, _ = rows.indices(len(self))
        stop = max(start, stop)
        root = self.root
        if root is self:
            self._write_root_obs(target, name, slice(start, stop))
            return
        cells = np.asarray(self.indices)[start:stop]
        runs = contiguous_runs(cells)
        if len(runs) == 1:
            root._write_root_obs(target, name, slice(int(runs[0, 0]), int(runs[0, 1])))
        else:
            write_obs_frame(target, name, root._all_obs().iloc[cells])

    @property
    def obs(self) -> pd.DataFrame:
        """A copy of the obs rows of this dataset's items (e.g. for stratified splits)."""
        root = self.root
        if root is self:
            return self._all_obs().copy()
        return root._all_obs().iloc[self.indices].copy()

    @property
    def layer(self) -> str | None:
        """Layer the counts were read from (``None`` for ``X``)."""
        return self.root._layer

    @property
    def batch_key(self) -> str | None:
        """obs column of the batch labels."""
        return self.root._batch_key

    @property
    def class_key(self) -> str | None:
        """obs column of the class labels."""
        return self.root._class_key

    @property
    def spatial_key(self) -> str | None:
        """obsm entry of the coordinates."""
        return self.root._spatial_key

    @property
    def batch_categories(self) -> list[str]:
        """Batch names in code order (``["0"]`` when there is no batch key)."""
        return list(self.root._batch_categories)

    @property
    def n_batches(self) -> int:
        """Number of batch categories."""
        return len(self.root._batch_categories)

    @property
    def class_categories(self) -> list[str] | None:
        """Class names in code order, ``None`` without a class key."""
        cats = self.root._class_categories
        return None if cats is None else list(cats)

    @property
    def n_classes(self) -> int:
        """Number of class categories (0 without a class key)."""
        cats = self.root._class_categories
        return 0 if cats is None else len(cats)

    # ------------------------------------------------------------------ per-item arrays
    def _take(self, array: np.ndarray | None) -> np.ndarray | None:
        if array is None or self.root is self:
            return array
        return array[self.indices]

    @property
    def X(self) -> sp.csr_matrix:
        """Counts of this dataset's items as a float32 CSR matrix.

        The root returns its stored matrix (do not modify it); a view returns the
        rows it selects.
        """
        if self.root is self:
            return self._X
        return self.root._csr_rows(self.indices)

    @property
    def library(self) -> np.ndarray:
        """Total counts per item (float32)."""
        return self._take(self.root._library)

    @property
    def batch_codes(self) -> np.ndarray:
        """Batch code per item (int64; zeros without a batch key)."""
        return self._take(self.root._batch_codes)

    @property
    def class_codes(self) -> np.ndarray | None:
        """Class code per item (int64), ``None`` without a class key."""
        return self._take(self.root._class_codes)

    @property
    def spatial(self) -> np.ndarray | None:
        """Coordinates per item (float32, shape ``(n, 2)``), ``None`` without them."""
        return self._take(self.root._spatial)

    @property
    def section_codes(self) -> np.ndarray:
        """Section code per item (spatial datasets only; same as :attr:`batch_codes`)."""
        if not isinstance(self.root, StDataset):
            msg = f"{type(self.root).__name__} has no sections; use StDataset for spatial data"
            raise AttributeError(msg)
        return self.batch_codes

    @property
    def section_categories(self) -> list[str]:
        """Section names in code order (spatial datasets only)."""
        if not isinstance(self.root, StDataset):
            msg = f"{type(self.root).__name__} has no sections; use StDataset for spatial data"
            raise AttributeError(msg)
        return self.batch_categories

    @property
    def n_sections(self) -> int:
        """Number of sections (spatial datasets only)."""
        return len(self.section_categories)

    # ------------------------------------------------------------------ indexing
    def _positions(self, idx: IndexLike) -> tuple[np.ndarray, bool]:
        """Positions (int64 array) selected by ``idx`` and whether ``idx`` was a scalar."""
        n = len(self)
        if isinstance(idx, torch.Tensor):
            idx = idx.item() if idx.ndim == 0 else idx.detach().cpu().numpy()
        if isinstance(idx, bool | np.bool_):
            msg = "a boolean is not a valid index; use an integer, a sequence of integers or a boolean mask"
            raise TypeError(msg)
        if isinstance(idx, int | np.integer):
            pos = int(idx)
            if not -n <= pos < n:
                msg = f"index {pos} is out of range for a dataset of {n} items"
                raise IndexError(msg)
            return np.array([pos % n], dtype=np.int64), True
        if isinstance(idx, slice):
            return np.arange(n, dtype=np.int64)[idx], False
        arr = np.asarray(idx)
        if arr.ndim != 1:
            msg = f"indices must be one-dimensional, received shape {arr.shape}"
            raise IndexError(msg)
        if arr.dtype == bool:
            if arr.size != n:
                msg = f"boolean mask has length {arr.size}, the dataset has {n} items"
                raise IndexError(msg)
            return np.flatnonzero(arr).astype(np.int64), False
        if arr.size == 0:
            return np.empty(0, dtype=np.int64), False
        if not np.issubdtype(arr.dtype, np.integer):
            msg = f"indices must be integers or a boolean mask, received dtype {arr.dtype}"
            raise IndexError(msg)
        arr = arr.astype(np.int64, copy=True)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -n or hi >= n:
            bad = lo if lo < -n else hi
            msg = f"index {bad} is out of range for a dataset of {n} items"
            raise IndexError(msg)
        if lo < 0:
            arr[arr < 0] += n
        return arr, False

    def _gather(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Batched item for positions of this dataset (densifies only these rows)."""
        root = self.root
        rows = self._root_rows(positions)
        out: dict[str, torch.Tensor] = {
            ITEM_KEYS.X: torch.from_numpy(root._dense_rows(rows)),
            ITEM_KEYS.LIBRARY: torch.from_numpy(root._library[rows]),
            ITEM_KEYS.INDEX: torch.from_numpy(positions.astype(np.int64, copy=True)),
        }
        extras = _MODE_EXTRAS[self._mode]
        if ITEM_KEYS.BATCH in extras:
            out[ITEM_KEYS.BATCH] = torch.from_numpy(root._batch_codes[rows])
        if ITEM_KEYS.LABEL in extras:
            out[ITEM_KEYS.LABEL] = torch.from_numpy(root._class_codes[rows])
        if ITEM_KEYS.SPATIAL in extras:
            out[ITEM_KEYS.SPATIAL] = torch.from_numpy(root._spatial[rows])
        return out

    def __getitem__(self, idx: IndexLike) -> dict[str, torch.Tensor]:
        positions, scalar = self._positions(idx)
        batch = self._gather(positions)
        if scalar:
            return {k: v[0] for k, v in batch.items()}
        return batch

    def set_read_blocks(self, block_rows: int | None, max_blocks: int = 64) -> None:
        """Hint that reads come in blocks of ``block_rows`` consecutive rows.

        Datasets that read from disk (:class:`~step.utils.ondisk.OnDiskDataset`) then
        read whole blocks and keep the ``max_blocks`` most recently used in memory;
        datasets in memory read their rows directly and ignore the hint.
        """

    def subset(self, indices: IndexLike) -> MaskedDataset:
        """A view of the items at ``indices`` (positions in this dataset).

        Parameters
        ----------
        indices
            Integer positions (sequence, array, tensor, slice) or a boolean mask.

        Returns
        -------
        A :class:`MaskedDataset` sharing this dataset's data, starting in this dataset's mode.
        """
        positions, _ = self._positions(indices)
        return MaskedDataset(self, positions)


class MaskedDataset(BaseDataset):
    """A view of a dataset restricted to some of its items.

    The view shares the data of its root dataset and has its own mode. Views of
    views compose: :attr:`indices` always holds positions in the root dataset.

    Parameters
    ----------
    parent
        Dataset (or view) to take items from.
    indices
        Positions in ``parent`` (integers or a boolean mask).
    mode
        Mode of the view; defaults to the parent's mode.
    """

    def __init__(self, parent: BaseDataset, indices: IndexLike, *, mode: str | None = None) -> None:
        if not isinstance(parent, BaseDataset):
            msg = f"parent must be a BaseDataset, received {type(parent).__name__}"
            raise TypeError(msg)
        positions, scalar = parent._positions(indices)
        if scalar:
            msg = "indices of a view must be a sequence, array or mask, not a single integer"
            raise TypeError(msg)
        self._parent_root = parent.root
        self._view_indices = _read_only(parent._root_rows(positions).astype(np.int64, copy=True))
        self._mode = parent.mode
        self.set_mode(parent.mode if mode is None else mode)

    @property
    def root(self) -> BaseDataset:
        return self._parent_root

    @property
    def indices(self) -> np.ndarray:
        return self._view_indices

    def _root_rows(self, positions: np.ndarray) -> np.ndarray:
        return self._view_indices[positions]

    def __len__(self) -> int:
        return int(self._view_indices.size)


class ScDataset(BaseDataset):
    """Dataset for single-cell data (no coordinates).

    Parameters
    ----------
    adata
        Annotated data matrix with raw integer counts.
    layer, batch_key, class_key, mode
        As in :class:`BaseDataset`.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        class_key: str | None = None,
        mode: str = MODES.EXPR,
    ) -> None:
        super().__init__(
            adata, layer=layer, batch_key=batch_key, class_key=class_key, spatial_key=None, mode=mode
        )


class StDataset(BaseDataset):
    """Dataset for spatial data: coordinates are required.

    Sections double as batches: ``batch_key`` names the obs column holding the
    section of each spot, and :attr:`section_codes` equals :attr:`batch_codes`.

    Parameters
    ----------
    adata
        Annotated data matrix with raw integer counts and coordinates in ``obsm``.
    layer
        Layer holding the counts; ``None`` reads ``adata.X``.
    batch_key
        Column of ``adata.obs`` with the section (and batch) of each spot; one
        section when ``None``.
    class_key
        Column of ``adata.obs`` with class labels.
    spatial_key
        Entry of ``adata.obsm`` with the coordinates.
    mode
        Initial mode.

    Raises
    ------
    KeyError
        If ``adata.obsm`` has no ``spatial_key`` entry (besides the errors of
        :class:`BaseDataset`).
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        class_key: str | None = None,
        spatial_key: str = "spatial",
        mode: str = MODES.EXPR,
    ) -> None:
        check_adata(adata)
        if spatial_key is None:
            msg = "StDataset needs coordinates; spatial_key must name an entry of adata.obsm"
            raise ValueError(msg)
        check_obsm_key(adata, spatial_key, role="spatial_key")
        super().__init__(
            adata, layer=layer, batch_key=batch_key, class_key=class_key, spatial_key=spatial_key, mode=mode
        )


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def index_loader(
    dataset: BaseDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    block_size: int | None = None,
    buffer_blocks: int = 16,
) -> DataLoader:
    """A DataLoader that gathers whole mini-batches by index.

    The loader's sampler (:class:`IndexBatchSampler`) yields arrays of positions, and
    each is passed to ``dataset[positions]`` at once (``batch_size=None`` with an
    identity collate), so a batch costs one CSR row slice instead of one call per cell.

    Parameters
    ----------
    dataset
        A :class:`BaseDataset` or view.
    batch_size
        Items per batch (>= 1).
    shuffle
        Reshuffle every epoch.
    drop_last
        Drop the last incomplete batch.
    seed
        Seed for the shuffling; the same seed gives the same batches epoch by epoch.
    num_workers
        Worker processes of the DataLoader.
    pin_memory
        Pin batches in page-locked memory.
    block_size
        ``None`` shuffles rows independently (:class:`IndexBatchSampler`); an integer
        shuffles contiguous blocks of that many rows and rows within buffers of
        ``buffer_blocks`` blocks (:class:`~step.utils.block_sampler.BlockBatchSampler`),
        so each batch reads few contiguous ranges of an on-disk matrix. The dataset is
        also told to read whole blocks of that many rows and keep about two buffers' worth
        in memory (:meth:`BaseDataset.set_read_blocks`), so a block is read from disk once
        per epoch, not once per batch that touches it.
    buffer_blocks
        Blocks shuffled together when ``block_size`` is set.

    Returns
    -------
    A :class:`torch.utils.data.DataLoader` yielding dicts of batched tensors.

    Raises
    ------
    ValueError
        If ``batch_size < 1`` or the dataset is empty.
    """
    if not isinstance(dataset, BaseDataset):
        msg = f"dataset must be a BaseDataset or one of its views, received {type(dataset).__name__}"
        raise TypeError(msg)
    batch_size = check_batch_size(batch_size)
    if len(dataset) == 0:
        msg = "cannot build a loader over an empty dataset"
        raise ValueError(msg)
    sampler: Sampler[np.ndarray]
    if block_size is None:
        sampler = IndexBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    else:
        sampler = BlockBatchSampler(
            len(dataset),
            batch_size,
            block_size=block_size,
            buffer_blocks=buffer_blocks,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
        )
        # A block of positions spans about n_root / n_view rows of the root (and so that
        # many aligned blocks, plus one): the cache holds one buffer and the next, the
        # two a batch may straddle, whatever fraction of rows the view has.
        spread = -(-len(dataset.root) // len(dataset)) + 1
        dataset.root.set_read_blocks(block_size, (buffer_blocks + 1) * spread)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
