"""Workflow input that stays on disk: paths of .h5ad files or .zarr stores, backed AnnData.

:func:`on_disk_sources` recognises such input; :func:`annotations` reads the obs and
gene names of the files (never their counts) into an AnnData without ``X`` that the
workflow writes its results into; :func:`selected_genes` picks the highly variable genes
in one streaming pass over the counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from step.utils.ondisk import OnDiskDataset, read_annotations
from step.utils.streaming_hvg import highly_variable_from_blocks

__all__ = ["annotations", "on_disk_sources", "selected_genes"]


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def on_disk_sources(data: Any) -> list[Any] | None:
    """The files behind ``data`` when it is on-disk input, else ``None``.

    On-disk input is a path, an AnnData opened with ``backed="r"``, or a list or tuple
    of these (one collection).
    """
    if _is_path(data) or (isinstance(data, ad.AnnData) and data.isbacked):
        return [data]
    if isinstance(data, list | tuple) and data and all(
            _is_path(s) or isinstance(s, ad.AnnData) for s in data):
        return list(data)
    return None


def _name(source: Any) -> str:
    return repr(os.fspath(source.filename if isinstance(source, ad.AnnData) else source))


def _check_unique_cells(frames: Sequence[pd.DataFrame], sources: Sequence[Any]) -> None:
    """Refuse cell names that repeat within or across files, naming the files."""
    names = pd.Index(np.concatenate([np.asarray(f.index.astype(str)) for f in frames]))
    if not names.has_duplicates:
        return
    which = np.repeat(np.arange(len(frames)), [len(f) for f in frames])
    repeated = names.duplicated(keep=False)
    clashes = []
    for cell in pd.unique(names[repeated])[:5]:
        files = sorted(set(which[np.asarray(names == cell)]))
        clashes.append(f"{cell!r} in " + " and ".join(_name(sources[i]) for i in files))
    msg = (f"cell names (obs_names) repeat within or across the files "
           f"({int(names.duplicated().sum())} repeats; e.g. {'; '.join(clashes)}); results "
           "are stored per cell name, so make them unique before writing the files, e.g. "
           "adata.obs_names = 'lane1_' + adata.obs_names")
    raise ValueError(msg)


def annotations(sources: Sequence[Any], *, layer: str | None,
                genes: Sequence[str] | None = None) -> ad.AnnData:
    """An AnnData without counts: the files' obs, concatenated in order, and the genes.

    The genes are ``genes`` or the first file's; every file must hold them all (matched
    by name), otherwise a ``ValueError`` lists what each file lacks.
    """
    read = [read_annotations(s, layer=layer) for s in sources]
    frames = [obs for obs, _ in read]
    _check_unique_cells(frames, sources)
    names = pd.Index([str(g) for g in (read[0][1] if genes is None else genes)])
    problems = []
    for source, (_, var_names) in zip(sources, read, strict=True):
        missing = names.difference(var_names, sort=False)
        extra = var_names.difference(names, sort=False)
        if len(missing):
            problems.append(f"{_name(source)} lacks {len(missing)} genes: "
                            f"{', '.join(map(repr, missing[:10]))}"
                            f"{' ...' if len(missing) > 10 else ''} (and has {len(extra)} "
                            "genes the others lack)")
    if problems:
        msg = ("the files' genes cannot be matched by name: " + "; ".join(problems)
               + ". Write the files with the same genes, or pass genes= (a gene list every "
               "file holds)")
        raise ValueError(msg)
    obs = frames[0].copy() if len(frames) == 1 else pd.concat(frames, axis=0)
    obs.index = obs.index.astype(str)
    return ad.AnnData(obs=obs, var=pd.DataFrame(index=names))


def selected_genes(sources: Sequence[Any], genes: Sequence[str], n_top_genes: int, *,
                   layer: str | None, batches: np.ndarray | None) -> list[str]:
    """The ``n_top_genes`` most variable of ``genes``, in their order, read block by block."""
    dataset = OnDiskDataset(sources, layer=layer, genes=genes)
    try:
        mask = highly_variable_from_blocks(dataset.iter_blocks(), genes, n_top_genes,
                                           batches=batches)
    finally:
        dataset.close()
    return [g for g, keep in zip(genes, mask, strict=True) if keep]
