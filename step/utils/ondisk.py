"""Single-cell counts read from disk in mini-batches, one file or a collection of files.

:class:`OnDiskDataset` behaves like :class:`step.utils.dataset.ScDataset` for the
Trainer (same batch dicts, ``n_genes``, ``obs``, ``subset`` views, ``len``) but keeps
the count matrix on disk: an ``.h5ad`` file (also one opened with
``anndata.read_h5ad(path, backed="r")``) or a ``.zarr`` store holding a CSR matrix in
``X`` or in a layer. Rows are always read in increasing order: a batch's rows are
sorted and de-duplicated, read, and put back in the requested order in memory,
because sorted reads are much faster than random ones in HDF5 and zarr. Each run of
consecutive rows is one access to the stored values (:func:`step.utils.read_rows`,
with the row pointers held in memory); whole blocks of rows are read with anndata's
sparse reader (:func:`anndata.io.sparse_dataset`).

Several files form one collection: their rows are concatenated and their columns
are matched by gene name to one gene order (the first file's unless ``genes`` is
given). A file that lacks some of the genes is refused with the list of what it lacks.
Only gene names, per-cell totals, row pointers, the batch and class codes and (with
``spatial_key``) the coordinates are kept in memory; obs and the cell names are read
from the files when asked for (``OnDiskDataset.obs``, ``obs_names``) and copied
file to file into results (:meth:`~step.utils.dataset.BaseDataset.write_obs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from step._constants import MODES
from step.utils.block_cache import RowBlockCache
from step.utils.dataset import BaseDataset
from step.utils.row_runs import read_rows
from step.utils.store_copy import copy_element, write_obs_frame
from step.utils.validation import check_counts

try:  # anndata >= 0.11
    from anndata.io import read_elem, sparse_dataset
except ImportError:  # pragma: no cover - older anndata
    from anndata.experimental import read_elem, sparse_dataset

__all__ = ["OnDiskDataset", "OnDiskReadError", "read_annotations"]

PathLike = str | os.PathLike
Source = PathLike | ad.AnnData

#: Rows read at once when scanning a file for totals and count checks.
_SCAN_ROWS = 8192


class OnDiskReadError(OSError):
    """Reading rows of an on-disk file failed (moved, removed, truncated or rewritten
    while it was in use); the message names the file."""


def _listing(names: Sequence[Any], limit: int = 20) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _source_path(source: Source) -> Path:
    if isinstance(source, ad.AnnData):
        if not source.isbacked:
            msg = (
                "the AnnData object is in memory; use ScDataset for it, or pass the path of an "
                ".h5ad/.zarr file (or anndata.read_h5ad(path, backed='r'))"
            )
            raise TypeError(msg)
        return Path(source.filename)
    if not isinstance(source, str | os.PathLike):
        msg = f"expected a path to an .h5ad or .zarr store or a backed AnnData, received {type(source).__name__}"
        raise TypeError(msg)
    return Path(source)


class _CountsFile:
    """One on-disk AnnData store: its obs, gene names and CSR counts element.

    The store is opened lazily and reopened after unpickling (DataLoader workers).
    """

    def __init__(self, path: Path, layer: str | None) -> None:
        self.path = path
        if not path.exists():
            msg = f"{str(path)!r}: no such file or directory"
            raise FileNotFoundError(msg)
        if path.is_dir() or path.suffix == ".zarr":
            self.kind = "zarr"
        elif path.suffix in (".h5ad", ".h5"):
            self.kind = "h5ad"
        else:
            msg = f"{str(path)!r}: expected an .h5ad file or a .zarr store"
            raise ValueError(msg)
        self.element = "X" if layer is None else f"layers/{layer}"
        self._store: Any = None
        self._counts: Any = None
        self._indptr: np.ndarray | None = None
        store = self.store
        obs = store["obs"]
        self._index_key = str(obs.attrs["_index"])
        order = obs.attrs.get("column-order", [])
        self.obs_columns = [str(c) for c in np.asarray(order, dtype=object).reshape(-1)]
        n_obs_rows = int(obs[self._index_key].shape[0])
        self.var_names = pd.Index(read_elem(store["var"]).index.astype(str))
        self._check_element(store, layer)
        self._identity = self._stat()
        self.n_obs, n_vars = (int(s) for s in self.counts.shape)
        if n_vars != len(self.var_names) or self.n_obs != n_obs_rows:
            msg = f"{self.name}: {self.element} has shape {self.counts.shape}, obs x var is {n_obs_rows} x {len(self.var_names)}"
            raise ValueError(msg)

    @property
    def name(self) -> str:
        """The path, quoted, for messages."""
        return repr(str(self.path))

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        """Inode, size and modification time of the file (of a zarr store: of its folder
        and of the folder of the counts' chunks), to notice a file changed under us."""
        paths = [self.path]
        if self.kind == "zarr":
            paths.append(self.path / self.element / "data")
        found = [os.stat(p) for p in paths if p == self.path or p.exists()]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in found)

    def _check_unchanged(self) -> None:
        try:
            same = self._stat() == self._identity
        except FileNotFoundError:
            self.close()
            msg = f"{self.name} was removed while in use; restore it to continue"
            raise OnDiskReadError(msg) from None
        if not same:
            self.close()
            msg = (f"{self.name} was changed (truncated, replaced or rewritten) while in use; "
                   "restore it to continue")
            raise OnDiskReadError(msg)

    def _check_element(self, store: Any, layer: str | None) -> None:
        layers = list(store["layers"].keys()) if "layers" in store else []
        if layer is None and "X" not in store:
            msg = f"{self.name} has no counts in X; pass layer= (layers: {_listing(layers) or 'none'})"
            raise ValueError(msg)
        if layer is not None and layer not in layers:
            msg = f"{self.name}: layer {layer!r} not found; layers: {_listing(layers) or 'none'}"
            raise KeyError(msg)
        encoding = store[self.element].attrs.get("encoding-type", "dense array")
        if encoding != "csr_matrix":
            msg = (
                f"{self.name}: {self.element} is stored as {encoding!r}; reading from disk needs a "
                "CSR sparse matrix (write it with adata.X = scipy.sparse.csr_matrix(adata.X))"
            )
            raise ValueError(msg)

    @property
    def store(self) -> Any:
        if self._store is None:
            if self.kind == "zarr":
                import zarr

                self._store = zarr.open(str(self.path), mode="r")
            else:
                import h5py

                self._store = h5py.File(self.path, "r")
        return self._store

    @property
    def counts(self) -> Any:
        """The counts element as an anndata sparse dataset."""
        if self._counts is None:
            self._counts = sparse_dataset(self.store[self.element])
        return self._counts

    @property
    def indptr(self) -> np.ndarray:
        """Row pointers of the counts, read once and kept in memory (``n_obs + 1`` ints)."""
        if self._indptr is None:
            self._indptr = np.asarray(self.store[self.element]["indptr"][:], dtype=np.int64)
        return self._indptr

    def read(self, rows: np.ndarray | slice) -> sp.csr_matrix:
        """Rows (a slice or increasing unique positions) as a float32 CSR matrix."""
        self._check_unchanged()
        try:
            if isinstance(rows, np.ndarray):
                block = read_rows(self.store[self.element], self.indptr, rows,
                                  len(self.var_names))
            else:
                block = self.counts[rows]
                if hasattr(block, "to_memory"):
                    block = block.to_memory()
                block = sp.csr_matrix(block, dtype=np.float32)
        except Exception as err:  # h5py and zarr raise many types for a damaged store
            self.close()
            msg = (f"reading rows of {self.name} failed ({type(err).__name__}: {err}); was the "
                   "file moved, removed, truncated or rewritten while in use?")
            raise OnDiskReadError(msg) from err
        if block.shape[1] != len(self.var_names):
            self.close()
            msg = f"{self.name} changed while in use: its rows now have {block.shape[1]} columns"
            raise OnDiskReadError(msg)
        return block

    def read_obs(self) -> pd.DataFrame:
        """The file's whole obs table, read into memory."""
        return read_elem(self.store["obs"])

    def read_obs_column(self, key: str) -> pd.Series:
        """One column of obs, read into memory."""
        return pd.Series(read_elem(self.store["obs"][key]))

    def read_obs_names(self) -> np.ndarray:
        """The file's cell names, read into memory."""
        return np.asarray(read_elem(self.store["obs"][self._index_key]), dtype=object).astype(str)

    def coordinates(self, key: str) -> np.ndarray:
        """The array ``obsm[key]`` of this file, read into memory."""
        obsm = self.store["obsm"] if "obsm" in self.store else {}
        if key not in obsm:
            msg = f"{self.name}: spatial_key {key!r} is not in obsm; obsm keys: {_listing(list(obsm.keys())) or 'none'}"
            raise KeyError(msg)
        return np.asarray(read_elem(obsm[key]))

    def close(self) -> None:
        if self._store is not None and self.kind == "h5ad":
            self._store.close()
        self._store = self._counts = self._indptr = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = state["_counts"] = state["_indptr"] = None
        return state


class OnDiskDataset(BaseDataset):
    """Dataset over counts kept on disk, in one file or a collection of files.

    Parameters
    ----------
    sources
        Path of an ``.h5ad`` file or ``.zarr`` store, an AnnData opened with
        ``backed="r"``, or a sequence of these read as one collection (rows
        concatenated in order).
    layer
        Layer holding the counts in every file; ``None`` reads ``X``.
    batch_key
        Column of obs with batch labels (in every file); batch 0 when ``None``.
    class_key
        Column of obs with class labels (in every file).
    spatial_key
        Entry of obsm with coordinates (in every file; the first two columns are used),
        kept in memory; needed by the ``"spatial"`` mode. ``None`` skips coordinates.
    genes
        Gene order of the dataset; the first file's genes when ``None``. Each file's
        columns are reordered to it; genes a file has beyond these are not used.
    obs
        Annotations to read labels from instead of the files' obs (one row per
        cell, in the files' row order), e.g. with categories aligned to a model.
    mode
        Initial mode, one of ``"expr"``, ``"batch"``, ``"class"``, ``"spatial"``.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    KeyError
        If a layer, obs column or obsm entry is missing from a file (the message names
        the file).
    ValueError
        If a file lacks some genes (listed), stores no CSR counts, or holds
        values that are not counts.

    Notes
    -----
    Opening scans each file once, in blocks of rows, to check the counts and compute
    the per-cell totals; the matrix itself is never held in memory. ``dataset[idx]``
    reads the rows of ``idx`` in increasing order, one slice per run of consecutive
    rows, and returns the same dict as :class:`~step.utils.dataset.ScDataset`. Use
    block shuffling (``index_loader(..., block_size=...)``) when training, so that each
    batch reads a few contiguous ranges instead of one range per cell. For spatial
    training with
    :meth:`~step.functionality.comps.trainer.Trainer.train_node_sampler`, write the
    store in the order of :func:`step.graph.spatial_order`
    (:func:`step.utils.write_in_order`) so that each sampled sub-graph reads a few
    ranges as well.
    """

    def __init__(
        self,
        sources: Source | Sequence[Source],
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        class_key: str | None = None,
        spatial_key: str | None = None,
        genes: Sequence[str] | None = None,
        obs: pd.DataFrame | None = None,
        mode: str = MODES.EXPR,
    ) -> None:
        if isinstance(sources, str | os.PathLike | ad.AnnData):
            sources = [sources]
        sources = list(sources)
        if not sources:
            msg = "no files given"
            raise ValueError(msg)
        self._files = [_CountsFile(_source_path(s), layer) for s in sources]
        for f in self._files:
            for key, role in ((batch_key, "batch_key"), (class_key, "class_key")):
                columns = f.obs_columns if obs is None else list(obs.columns)
                if key is not None and key not in columns:
                    msg = f"{f.name}: {role} {key!r} is not a column of obs; columns: {_listing(columns)}"
                    raise KeyError(msg)

        self._var_names = pd.Index(self._files[0].var_names if genes is None else [str(g) for g in genes])
        if self._var_names.has_duplicates:
            dup = self._var_names[self._var_names.duplicated()].unique()
            msg = f"gene names must be unique; duplicated: {_listing(dup)}"
            raise ValueError(msg)
        self._columns = self._match_genes()

        self._layer = layer
        self._caches: list[RowBlockCache | None] = [None] * len(self._files)
        self._n_genes = len(self._var_names)
        self._offsets = np.cumsum([0] + [f.n_obs for f in self._files]).astype(np.int64)
        self._n_obs = int(self._offsets[-1])
        if self._n_obs == 0 or self._n_genes == 0:
            msg = f"the data are empty ({self._n_obs} cells x {self._n_genes} genes)"
            raise ValueError(msg)
        self._given_obs: pd.DataFrame | None = None
        if obs is not None:
            if len(obs) != self._n_obs:
                msg = f"obs has {len(obs)} rows, the files hold {self._n_obs} cells"
                raise ValueError(msg)
            self._given_obs = obs.copy()
        self._library = self._scan()
        self._library.flags.writeable = False
        self._warn_empty_cells()
        obsm = {}
        if spatial_key is not None:
            obsm[spatial_key] = np.concatenate([f.coordinates(spatial_key) for f in self._files])
        annotations = SimpleNamespace(obs=self._label_columns(batch_key, class_key), obsm=obsm)
        self._init_annotations(
            annotations, batch_key=batch_key, class_key=class_key, spatial_key=spatial_key, mode=mode
        )

    # ------------------------------------------------------------------ set-up
    def _label_columns(self, *keys: str | None) -> pd.DataFrame:
        """The obs columns ``keys`` of all cells (given obs or read from the files)."""
        keys = tuple(dict.fromkeys(k for k in keys if k is not None))
        if self._given_obs is not None:
            return self._given_obs.loc[:, list(keys)]
        return pd.DataFrame({
            key: pd.concat([f.read_obs_column(key) for f in self._files], ignore_index=True)
            for key in keys
        }, index=pd.RangeIndex(self._n_obs))

    def _match_genes(self) -> list[np.ndarray | None]:
        """Per file, the columns giving the dataset's gene order (``None``: as stored)."""
        columns: list[np.ndarray | None] = []
        problems = []
        for f in self._files:
            if f.var_names.has_duplicates:
                problems.append(f"{f.name} has duplicated gene names: {_listing(f.var_names[f.var_names.duplicated()])}")
                continue
            missing = self._var_names.difference(f.var_names, sort=False)
            if len(missing):
                problems.append(f"{f.name} lacks {len(missing)} genes: {_listing(missing)}")
                continue
            if f.var_names.equals(self._var_names):
                columns.append(None)
            else:
                columns.append(f.var_names.get_indexer(self._var_names).astype(np.int64))
        if problems:
            msg = "the files do not share the dataset's genes:\n  " + "\n  ".join(problems)
            raise ValueError(msg)
        return columns

    def _scan(self) -> np.ndarray:
        """Check every file's counts and return per-cell totals, reading blocks of rows."""
        library = np.empty(self._n_obs, dtype=np.float32)
        ones = np.ones(self._n_genes, dtype=np.float64)
        for f, cols, offset in zip(self._files, self._columns, self._offsets, strict=False):
            for start in range(0, f.n_obs, _SCAN_ROWS):
                stop = min(start + _SCAN_ROWS, f.n_obs)
                block = f.read(slice(start, stop))
                check_counts(block, name=f"{f.name} {f.element} (rows {start} to {stop - 1})")
                if cols is not None:
                    block = block[:, cols]
                library[offset + start : offset + stop] = np.asarray(block @ ones, dtype=np.float32).reshape(-1)
        return library

    # ------------------------------------------------------------------ reading
    def iter_blocks(self, rows: int = _SCAN_ROWS) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Contiguous blocks of all rows of the files, in order, in the dataset's gene order
        (for a view: of the dataset it was made from).

        Parameters
        ----------
        rows
            Rows per block (the last block may be shorter); blocks never span two files.

        Yields
        ------
        The position of the block's first row and its float32 CSR counts.
        """
        for f, cols, offset in zip(self.root._files, self.root._columns, self.root._offsets,
                                   strict=False):
            for start in range(0, f.n_obs, rows):
                block = f.read(slice(start, min(start + rows, f.n_obs)))
                yield int(offset) + start, block if cols is None else block[:, cols]

    @property
    def files(self) -> list[Path]:
        """Paths of the files, in row order."""
        return [f.path for f in self.root._files]

    def set_read_blocks(self, block_rows: int | None, max_blocks: int = 64) -> None:
        """Read rows in aligned blocks and keep the recently used blocks in memory.

        Suits block-shuffled training, whose batches come back to the same few blocks
        (:func:`~step.utils.dataset.index_loader` sets it when given ``block_size``),
        and sequential reads: each block is then read from disk once per pass instead
        of once per batch that touches it.

        Parameters
        ----------
        block_rows
            Rows per block (per file, from its first row); ``None`` reads only the
            requested rows, without a cache.
        max_blocks
            Blocks kept per file; memory is about ``max_blocks * block_rows`` rows of
            stored values.
        """
        root = self.root
        if block_rows is None:
            root._caches = [None] * len(root._files)
            return
        current = root._caches[0]
        if current is not None and current.block_rows == block_rows:
            for cache in root._caches:  # another loader of the same blocks: keep what is read
                cache.max_blocks = max(cache.max_blocks, int(max_blocks))
            return
        root._caches = [RowBlockCache(f.n_obs, block_rows, max_blocks) for f in root._files]

    def _read_file(self, i: int, rows: np.ndarray) -> sp.csr_matrix:
        """Rows of file ``i`` (increasing unique positions in it), in the dataset's gene order."""
        f, cols = self._files[i], self._columns[i]

        def read(wanted: np.ndarray) -> sp.csr_matrix:
            block = f.read(wanted)
            return block if cols is None else block[:, cols]

        cache = self._caches[i]
        return read(rows) if cache is None else cache.rows(rows, read)

    def _read_sorted(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows given as increasing unique positions, in the dataset's gene order."""
        parts = []
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for i in np.unique(which):
            parts.append(self._read_file(int(i), rows[which == i] - self._offsets[i]))
        if not parts:
            return sp.csr_matrix((0, self._n_genes), dtype=np.float32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr", dtype=np.float32)

    def _csr_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self._read_sorted(unique)
        if unique.size == rows.size and np.array_equal(unique, rows):
            return block
        return block[inverse.reshape(-1)]

    def _all_obs_names(self) -> pd.Index:
        if self._given_obs is not None:
            return pd.Index(self._given_obs.index.astype(str))
        return pd.Index(np.concatenate([f.read_obs_names() for f in self._files]))

    def _all_obs(self) -> pd.DataFrame:
        if self._given_obs is not None:
            return self._given_obs
        frames = [f.read_obs() for f in self._files]
        return frames[0] if len(frames) == 1 else pd.concat(frames, axis=0)

    def _write_root_obs(self, target: Any, name: str, rows: slice) -> None:
        # The obs of one file is copied store to store, a slice at a time; the obs of
        # several files (concatenated) or given as ``obs=`` is written from memory.
        if self._given_obs is None and len(self._files) == 1:
            copy_element(self._files[0].store["obs"], target, name, rows=rows)
        else:
            write_obs_frame(target, name, self._all_obs().iloc[rows])

    def _dense_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._csr_rows(rows).toarray()

    @property
    def X(self) -> sp.csr_matrix:
        """Counts of this dataset's items read into memory as a float32 CSR matrix."""
        return self.root._csr_rows(self.indices)

    def close(self) -> None:
        """Close the open files (they are reopened on the next read) and empty the
        read cache."""
        for f in self._files:
            f.close()
        for cache in self._caches:
            if cache is not None:
                cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_caches"] = [None if c is None else RowBlockCache(c.n_rows, c.block_rows, c.max_blocks)
                            for c in self._caches]
        return state

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", n_files={len(self._files)})"


def read_annotations(source: Source, *, layer: str | None = None) -> tuple[pd.DataFrame, pd.Index]:
    """obs and gene names of one on-disk file, without reading its counts.

    Parameters
    ----------
    source
        Path of an ``.h5ad`` file or ``.zarr`` store, or an AnnData opened with
        ``backed="r"``.
    layer
        Layer that must hold the counts (as CSR); ``None`` checks ``X``.

    Returns
    -------
    The file's obs and its gene names.

    Raises
    ------
    FileNotFoundError, KeyError, ValueError
        As :class:`OnDiskDataset` for the same file.
    """
    file = _CountsFile(_source_path(source), layer)
    try:
        return file.read_obs(), file.var_names
    finally:
        file.close()
