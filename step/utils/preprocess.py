"""Preparation of count matrices for training: gene selection on a copy."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from step.utils.validation import (
    check_adata,
    check_counts,
    check_not_empty,
    check_obs_key,
    get_counts,
)

__all__ = ["check_n_top_genes", "hvg_flavor", "prepare_counts", "select_genes"]

_FLAVORS = ("seurat_v3", "seurat")


def hvg_flavor() -> str:
    """The highly-variable-gene method :func:`prepare_counts` uses by default.

    ``"seurat_v3"`` (variance of counts, needs the ``scikit-misc`` package) when it is
    installed, otherwise ``"seurat"`` (dispersion of log-normalised counts).
    """
    return "seurat_v3" if importlib.util.find_spec("skmisc") is not None else "seurat"


def check_n_top_genes(n_top_genes: object) -> None:
    """Raise unless ``n_top_genes`` is ``None`` or a positive integer."""
    if n_top_genes is None:
        return
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, int | np.integer):
        msg = f"n_top_genes must be a positive integer or None, received {n_top_genes!r}"
        raise TypeError(msg)
    if n_top_genes < 1:
        msg = f"n_top_genes must be a positive integer or None, received {n_top_genes}"
        raise ValueError(msg)


def select_genes(var_names: pd.Index, genes: Iterable[str]) -> np.ndarray:
    """Positions in ``var_names`` of the requested genes, in the order requested.

    Genes are matched by exact name; repeated requests are kept once. When only some
    genes match, a :class:`UserWarning` names the missing ones.

    Parameters
    ----------
    var_names
        Gene names of the data.
    genes
        Requested gene names.

    Returns
    -------
    int64 positions of the matching genes.

    Raises
    ------
    TypeError
        If ``genes`` is a single string.
    ValueError
        If ``genes`` is empty or none of the genes is found.
    """
    if isinstance(genes, str):
        msg = f"genes must be a list of gene names, received the single string {genes!r}"
        raise TypeError(msg)
    requested = list(dict.fromkeys(str(g) for g in genes))
    if not requested:
        msg = "genes is empty; pass at least one gene name or genes=None to keep all genes"
        raise ValueError(msg)
    names = pd.Index(var_names.astype(str))
    first = pd.Series(np.arange(len(names)), index=names)
    first = first[~names.duplicated()]
    found = first.reindex(requested)
    missing = found.index[found.isna()].tolist()
    if len(missing) == len(requested):
        msg = (
            f"none of the {len(requested)} requested genes is in adata.var_names "
            f"(requested e.g. {requested[:5]}; the data have e.g. {names[:5].tolist()})"
        )
        raise ValueError(msg)
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(requested)} requested genes are not in adata.var_names "
            f"(e.g. {missing[:5]}); keeping the {len(requested) - len(missing)} that are",
            UserWarning,
            stacklevel=2,
        )
    return found.dropna().to_numpy(dtype=np.int64)


def _highly_variable(
    counts: sp.csr_matrix, obs: pd.DataFrame, n_top_genes: int, batch_key: str | None, flavor: str
) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes of ``counts``."""
    import scanpy as sc

    tmp_obs = pd.DataFrame(index=obs.index.astype(str))
    if batch_key is not None:
        tmp_obs[batch_key] = obs[batch_key].astype(str).to_numpy()
    tmp = ad.AnnData(X=counts.copy(), obs=tmp_obs)
    if flavor == "seurat":
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        table = sc.pp.highly_variable_genes(
            tmp, flavor=flavor, n_top_genes=n_top_genes, batch_key=batch_key, inplace=False
        )
    mask = np.asarray(table["highly_variable"].to_numpy(), dtype=bool)
    if mask.sum() != n_top_genes:
        # Ties or batch-aware ranking can select a different number; fall back to the ranking.
        score = table["dispersions_norm"] if "dispersions_norm" in table else table["variances_norm"]
        order = np.argsort(-np.nan_to_num(score.to_numpy(dtype=float), nan=-np.inf), kind="stable")
        mask = np.zeros(mask.size, dtype=bool)
        mask[order[:n_top_genes]] = True
    return mask


def prepare_counts(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    genes: Iterable[str] | None = None,
    flavor: str | None = None,
) -> ad.AnnData:
    """A new AnnData with the integer counts to train on, optionally restricted to some genes.

    The input is never modified. Genes are first restricted to ``genes`` (in the order
    given), then to the ``n_top_genes`` most variable ones (kept in their order).

    Parameters
    ----------
    adata
        Annotated data matrix with raw integer counts.
    layer
        Layer holding the counts; ``None`` reads ``adata.X``.
    n_top_genes
        Number of highly variable genes to keep; ``None`` (or a number not below the
        number of genes) keeps all genes.
    batch_key
        obs column with batches, used for batch-aware gene selection.
    genes
        Gene names to keep. Missing names are dropped with a warning; if none match a
        :class:`ValueError` is raised.
    flavor
        Highly-variable-gene method for :func:`scanpy.pp.highly_variable_genes`:
        ``"seurat_v3"`` ranks genes by the variance of their counts and needs the
        ``scikit-misc`` package; ``"seurat"`` ranks by dispersion on a log-normalised
        copy (``normalize_total`` to 1e4, ``log1p``). ``None`` picks ``"seurat_v3"``
        when ``scikit-misc`` is installed and ``"seurat"`` otherwise (see
        :func:`hvg_flavor`).

    Returns
    -------
    AnnData with ``X`` a float32 ``scipy.sparse.csr_matrix`` of the counts of the
    selected genes, copies of ``obs``, the selected rows of ``var``, ``obsm``, ``obsp``
    and ``uns``. Layers, ``raw``, ``varm`` and ``varp`` are not carried over.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData object or ``genes`` is a single string.
    KeyError
        If ``layer`` or ``batch_key`` does not exist.
    ValueError
        If the data are empty or not counts, ``n_top_genes < 1``, ``flavor`` is unknown
        or no requested gene matches.
    """
    check_adata(adata)
    check_not_empty(adata)
    counts = get_counts(adata, layer)
    if batch_key is not None:
        check_obs_key(adata, batch_key, role="batch_key")
    check_n_top_genes(n_top_genes)
    if flavor is None:
        flavor = hvg_flavor()
    if flavor not in _FLAVORS:
        msg = f"flavor must be one of {list(_FLAVORS)} or None, received {flavor!r}"
        raise ValueError(msg)
    if flavor == "seurat_v3" and importlib.util.find_spec("skmisc") is None:
        msg = "flavor='seurat_v3' needs the scikit-misc package (pip install scikit-misc); or use flavor='seurat'"
        raise ImportError(msg)
    check_counts(counts, name="X" if layer is None else f"layers[{layer!r}]")

    if sp.issparse(counts):
        matrix = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    else:
        matrix = sp.csr_matrix(np.asarray(counts), dtype=np.float32)
    keep = np.arange(adata.n_vars, dtype=np.int64)
    if genes is not None:
        keep = select_genes(adata.var_names, genes)
        matrix = matrix[:, keep]
    if n_top_genes is not None and n_top_genes < keep.size:
        mask = _highly_variable(matrix, adata.obs, int(n_top_genes), batch_key, flavor)
        keep = keep[mask]
        matrix = matrix[:, np.flatnonzero(mask)]
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sort_indices()

    return ad.AnnData(
        X=matrix,
        obs=adata.obs.copy(),
        var=adata.var.iloc[keep].copy(),
        obsm={k: copy.deepcopy(v) for k, v in adata.obsm.items()},
        obsp={k: v.copy() for k, v in adata.obsp.items()},
        uns=copy.deepcopy(dict(adata.uns)),
    )
