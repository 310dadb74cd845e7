"""Clustering of embeddings: k-means, and Leiden at a resolution found for a cluster count."""

from __future__ import annotations

import warnings
from typing import Any

import anndata as ad
import numpy as np

__all__ = ["CLUSTER_METHODS", "cluster_labels", "leiden_for_n_clusters", "neighbor_graph"]

CLUSTER_METHODS = ("kmeans", "leiden")


def _as_rep(rep: Any) -> np.ndarray:
    rep = np.asarray(rep, dtype=np.float32)
    if rep.ndim != 2 or rep.shape[0] < 2:
        msg = f"the embedding must be a 2-D array with at least two rows, got shape {rep.shape}."
        raise ValueError(msg)
    if not np.isfinite(rep).all():
        msg = "the embedding holds NaN or infinite values."
        raise ValueError(msg)
    return rep


def neighbor_graph(rep: np.ndarray, *, n_neighbors: int = 15, seed: int = 0) -> ad.AnnData:
    """A scratch AnnData holding the kNN graph of ``rep`` (scanpy ``neighbors``)."""
    import scanpy as sc

    tmp = ad.AnnData(np.zeros((rep.shape[0], 0), dtype=np.float32))
    tmp.obsm["rep"] = rep
    n_neighbors = max(2, min(int(n_neighbors), rep.shape[0] - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=n_neighbors, random_state=seed)
    return tmp


def _leiden(graph: ad.AnnData, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.leiden(graph, resolution=resolution, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False, key_added="_leiden")
    return graph.obs["_leiden"].to_numpy().astype(np.int64)


def leiden_for_n_clusters(
    rep: Any,
    n_clusters: int,
    *,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iter: int = 20,
) -> tuple[np.ndarray, float]:
    """Leiden clusters of ``rep`` at the resolution whose cluster count is closest to
    ``n_clusters``.

    The resolution is found by bisection on ``[0, 4]`` starting at 1 (the number of
    Leiden clusters grows with the resolution); the first resolution that gives exactly
    ``n_clusters`` ends the search, otherwise the closest count seen wins (earliest on
    ties).

    Parameters
    ----------
    rep
        Embedding ``(n_cells, n_dims)``.
    n_clusters
        Wanted number of clusters.
    n_neighbors
        Neighbours of the kNN graph.
    seed
        Seed of the graph construction and of Leiden.
    max_iter
        Most resolutions tried.

    Returns
    -------
    The labels (int64, ``0..k-1``) and the resolution used.
    """
    rep = _as_rep(rep)
    n_clusters = _check_n_clusters(n_clusters, rep.shape[0])
    graph = neighbor_graph(rep, n_neighbors=n_neighbors, seed=seed)
    lo, hi, res = 0.0, 4.0, 1.0
    best: tuple[int, np.ndarray, float] | None = None
    for _ in range(max_iter):
        labels = _leiden(graph, res, seed)
        k = len(np.unique(labels))
        gap = abs(k - n_clusters)
        if best is None or gap < best[0]:
            best = (gap, labels, res)
        if k == n_clusters:
            break
        if k < n_clusters:
            lo = res
        else:
            hi = res
        res = (lo + hi) / 2
    return best[1], best[2]


def _check_n_clusters(n_clusters: Any, n_obs: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        msg = f"n_clusters must be a positive integer, got {n_clusters!r}."
        raise TypeError(msg)
    if not 1 <= int(n_clusters) <= n_obs:
        msg = f"n_clusters must lie in [1, {n_obs}] (the number of cells), got {n_clusters}."
        raise ValueError(msg)
    return int(n_clusters)


def cluster_labels(rep: Any, n_clusters: int, *, method: str = "kmeans", seed: int = 0,
                   n_neighbors: int = 15) -> np.ndarray:
    """Cluster an embedding into ``n_clusters`` groups.

    Parameters
    ----------
    rep
        Embedding ``(n_cells, n_dims)``.
    n_clusters
        Number of clusters (exact for k-means; the closest Leiden finds otherwise).
    method
        ``"kmeans"`` (scikit-learn, 10 restarts) or ``"leiden"``
        (:func:`leiden_for_n_clusters`).
    seed
        Random seed.
    n_neighbors
        Neighbours of the kNN graph (Leiden only).

    Returns
    -------
    int64 labels ``0..k-1``.
    """
    if method not in CLUSTER_METHODS:
        msg = f"method must be one of {CLUSTER_METHODS}, got {method!r}."
        raise ValueError(msg)
    rep = _as_rep(rep)
    n_clusters = _check_n_clusters(n_clusters, rep.shape[0])
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(rep).astype(np.int64)
    labels, _ = leiden_for_n_clusters(rep, n_clusters, n_neighbors=n_neighbors, seed=seed)
    return labels
