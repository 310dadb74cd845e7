"""Embeddings written straight to disk: a model runs over a dataset batch by batch and
each block of rows goes into ``obsm`` of an ``.h5ad`` file as soon as it is computed.

Neither the count matrix (read in batches by :class:`~step.utils.ondisk.OnDiskDataset`)
nor the whole embedding is held in memory; the peak is one batch of counts and one block
of outputs. The counts can be copied into the result file from store to store, never through
memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from step.utils.dataset import BaseDataset, index_loader
from step.utils.store_copy import copy_element, write_obs_frame

try:  # anndata >= 0.11
    from anndata.io import read_elem
except ImportError:  # pragma: no cover - older anndata
    from anndata.experimental import read_elem

__all__ = ["embed_to_h5ad"]

PathLike = str | os.PathLike


def _write_skeleton(path: Path, var: pd.DataFrame, uns: Mapping[str, Any] | None) -> None:
    """An ``.h5ad`` file with var and uns, no cells, and nothing else (its obs is replaced)."""
    ad.AnnData(obs=pd.DataFrame(index=pd.Index([], dtype=str)), var=var,
               uns=dict(uns or {})).write_h5ad(path)


def _array_dataset(group: h5py.Group, key: str, n_rows: int, width: int,
                   chunk_rows: int) -> h5py.Dataset:
    data = group.create_dataset(key, shape=(n_rows, width), dtype=np.float32,
                                chunks=(max(1, min(n_rows, chunk_rows)), max(1, width)))
    data.attrs["encoding-type"] = "array"
    data.attrs["encoding-version"] = "0.2.0"
    return data


def _source_counts(dataset: BaseDataset) -> tuple[Path, str]:
    """The one file and the element holding the counts of an on-disk dataset."""
    files = getattr(dataset.root, "files", None)
    if files is None or len(files) != 1:
        msg = ("copy_counts needs a dataset over one .h5ad file or .zarr store "
               f"(OnDiskDataset); this one is {type(dataset.root).__name__}"
               + ("" if files is None else f" over {len(files)} files"))
        raise ValueError(msg)
    layer = getattr(dataset, "layer", None)
    return Path(files[0]), "X" if layer is None else f"layers/{layer}"


def _check_copyable(source: Any, element: str, dataset: BaseDataset) -> None:
    n_obs = int(source[element].attrs["shape"][0])
    genes = pd.Index(read_elem(source["var"]).index.astype(str))
    if len(dataset) != n_obs or not genes.equals(pd.Index(dataset.var_names)):
        msg = ("copy_counts copies the file's counts as they are stored, so the dataset must "
               "hold all of the file's cells and genes in the file's order")
        raise ValueError(msg)


def _copy_counts(dataset: BaseDataset, target: h5py.File) -> None:
    path, element = _source_counts(dataset)
    if element != "X" and "layers" not in target:
        layers = target.create_group("layers")
        layers.attrs["encoding-type"], layers.attrs["encoding-version"] = "dict", "0.1.0"
    if element in target:
        del target[element]
    parent, _, name = element.rpartition("/")
    destination = target[parent] if parent else target
    if path.is_dir() or path.suffix == ".zarr":
        import zarr

        source = zarr.open(str(path), mode="r")
        _check_copyable(source, element, dataset)
        copy_element(source[element], destination, name)
        return
    with h5py.File(path, "r") as source:
        _check_copyable(source, element, dataset)
        copy_element(source[element], destination, name)


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def embed_to_h5ad(
    model: torch.nn.Module,
    dataset: BaseDataset,
    path: PathLike,
    *,
    outputs: Mapping[str, str] | None = None,
    batch_size: int = 1024,
    obs: pd.DataFrame | None = None,
    var: pd.DataFrame | None = None,
    uns: Mapping[str, Any] | None = None,
    copy_counts: bool = False,
    append: bool = False,
) -> Path:
    """Embed every cell of ``dataset`` and write the result to an ``.h5ad`` file on disk.

    Batches are read in dataset order, passed through the model in eval mode without
    gradients, and each block of outputs is written into ``obsm`` of the file at once.

    Parameters
    ----------
    model
        A model with the methods named in ``outputs`` (e.g.
        :class:`~step.models.TranscriptFormer`); each takes a batch dict and returns
        one row per cell.
    dataset
        The cells, e.g. an :class:`~step.utils.ondisk.OnDiskDataset` over counts on disk.
    path
        The ``.h5ad`` file to write (replaced if present).
    outputs
        obsm key -> model method; default ``{"X_rep": "embed"}``. Several entries are
        computed from the same batches in one pass.
    batch_size
        Cells per batch.
    obs, var, uns
        Annotations written beside the embedding; by default the dataset's ``obs`` and
        its genes as ``var``, no ``uns``. The obs of an
        :class:`~step.utils.ondisk.OnDiskDataset` is copied from its file
        (:meth:`~step.utils.dataset.BaseDataset.write_obs`), not held in memory.
    copy_counts
        Also copy the counts of the dataset's file (``X`` or the dataset's layer) into
        the result file, from store to store. Needs an on-disk dataset over one file
        holding all of its cells and genes in the file's order.
    append
        Add the outputs to ``obsm`` of the existing ``.h5ad`` file at ``path`` (one row
        per cell; entries with the same keys are replaced) instead of writing a new
        file; ``obs``, ``var``, ``uns`` and ``copy_counts`` are then not used.

    Returns
    -------
    ``path``, which :func:`anndata.read_h5ad` opens: obs, var, ``obsm[key]`` as float32
    ``(n_cells, width)`` arrays for every key of ``outputs``, and ``X`` only with
    ``copy_counts``.

    Raises
    ------
    ValueError
        If ``copy_counts`` cannot copy the dataset's counts as stored, or ``obs`` (or
        the file appended to) does not have one row per cell.
    FloatingPointError
        If an output holds NaN or infinite values; a new file is then removed.
    """
    path = Path(path)
    outputs = dict(outputs or {"X_rep": "embed"})
    for method in outputs.values():
        if not callable(getattr(model, method, None)):
            msg = f"the model has no method {method!r}"
            raise AttributeError(msg)
    if append:
        with h5py.File(path, "a") as file:
            _check_rows(file, len(dataset))
            obsm = file.require_group("obsm")
            for key in outputs:
                if key in obsm:
                    del obsm[key]
            _fill_obsm(model, dataset, obsm, outputs, batch_size)
        return path
    if obs is not None and len(obs) != len(dataset):
        msg = f"obs has {len(obs)} rows, the dataset holds {len(dataset)} cells"
        raise ValueError(msg)
    if var is None:
        var = pd.DataFrame(index=pd.Index([str(g) for g in dataset.var_names]))
    path.parent.mkdir(parents=True, exist_ok=True)
    # The skeleton's empty obs is replaced by the dataset's (an on-disk one copies it
    # file to file) or by the given frame.
    _write_skeleton(path, var, uns)
    try:
        with h5py.File(path, "a") as file:
            del file["obs"]
            if obs is None:
                dataset.write_obs(file, "obs")
            else:
                write_obs_frame(file, "obs", obs)
            if copy_counts:
                _copy_counts(dataset, file)
            _fill_obsm(model, dataset, file.require_group("obsm"), outputs, batch_size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _check_rows(file: h5py.File, n_cells: int) -> None:
    n_obs = len(read_elem(file["obs"]))
    if n_obs != n_cells:
        msg = f"{file.filename!r} holds {n_obs} cells, the dataset {n_cells}"
        raise ValueError(msg)


def _fill_obsm(model: torch.nn.Module, dataset: BaseDataset, obsm: h5py.Group,
               outputs: Mapping[str, str], batch_size: int) -> None:
    device = _device_of(model)
    loader = index_loader(dataset, batch_size, shuffle=False)
    targets: dict[str, h5py.Dataset] = {}
    start = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                inputs = {k: v.to(device) for k, v in batch.items()}
                for key, method in outputs.items():
                    block = getattr(model, method)(inputs).float().cpu().numpy()
                    block = block.reshape(len(block), -1)
                    if not np.isfinite(block).all():
                        msg = (f"obsm[{key!r}] holds NaN or infinite values in rows {start} "
                               f"to {start + len(block) - 1}; no result was written")
                        raise FloatingPointError(msg)
                    if key not in targets:
                        targets[key] = _array_dataset(obsm, key, len(dataset), block.shape[1],
                                                      batch_size)
                    targets[key][start:start + len(block)] = block
                start += len(next(iter(batch.values())))
    finally:
        model.train(was_training)
