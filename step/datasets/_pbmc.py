"""Integer counts of the 700 PBMCs that ship with scanpy."""

from __future__ import annotations

import functools
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["pbmc68k_counts"]

#: obs columns carried over from scanpy's ``pbmc68k_reduced``.
PBMC_OBS_KEYS = ("bulk_labels", "louvain", "phase", "n_counts")


@functools.lru_cache(maxsize=1)
def _load_pbmc68k_counts() -> ad.AnnData:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(source.raw.X, dtype=np.float64)
    totals = source.obs["n_counts"].to_numpy(dtype=np.float64)
    # raw.X = log1p(counts / n_counts * 1e4), rounded to three decimals: invert and round.
    per_value_total = np.repeat(totals, np.diff(raw.indptr))
    values = np.rint(np.expm1(raw.data) * per_value_total / 1e4)
    counts = sp.csr_matrix((values.astype(np.float32), raw.indices.copy(), raw.indptr.copy()), shape=raw.shape)
    counts.eliminate_zeros()
    counts.sort_indices()

    obs = pd.DataFrame(index=pd.Index(source.obs_names.astype(str)).rename(None))
    for key in PBMC_OBS_KEYS[:3]:
        obs[key] = pd.Categorical(source.obs[key].astype(str), categories=[str(c) for c in source.obs[key].cat.categories])
    obs["n_counts"] = source.obs["n_counts"].to_numpy(dtype=np.float32)
    var = pd.DataFrame(index=pd.Index(source.raw.var_names.astype(str)).rename(None))
    return ad.AnnData(X=counts, obs=obs, var=var)


def pbmc68k_counts() -> ad.AnnData:
    """Raw integer counts of the 700 PBMCs of :func:`scanpy.datasets.pbmc68k_reduced`.

    scanpy ships this small data set inside the package (nothing is downloaded). Its
    ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)`` for 765 genes, rounded to three
    decimals, where ``n_counts`` is each cell's total over the full gene set; the
    counts are recovered as ``round(expm1(raw.X) * n_counts / 1e4)``. Row sums over
    the 765 genes are therefore smaller than ``n_counts``.

    The object is built once per process; each call returns a fresh copy.

    Returns
    -------
    AnnData of 700 cells x 765 genes with

    - ``X``: ``scipy.sparse.csr_matrix`` of float32 integer counts;
    - ``obs["bulk_labels"]``, ``obs["louvain"]``, ``obs["phase"]``: categorical labels;
    - ``obs["n_counts"]``: float32 total counts of each cell over all genes.
    """
    return _load_pbmc68k_counts().copy()
