"""Clustering of embeddings: k-means, and Leiden at a resolution found for a cluster count."""

from __future__ import annotations

import warnings
from typing import Any

import anndata as ad
import numpy as np

from step.utils.threads import keep_torch_threads

__all__ = [
    "CLUSTER_METHODS",
    "cluster_labels",
    "leiden_for_n_clusters",
    "neighbor_graph",
    "spatial_majority_vote",
]

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
    with warnings.catch_warnings(), keep_torch_threads():
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


def spatial_majority_vote(labels: Any, edge_index: Any) -> np.ndarray:
    """Relabel spots whose spatial neighbours mostly carry another label.

    One synchronous pass: a spot takes the most frequent label among its neighbours
    (self-loops ignored) when more than half of its neighbours carry that label and it is
    not the spot's own; every other spot keeps its label. Isolated mislabels inside a
    domain are fixed, while borders (where neighbours split) and thin layers (where a
    spot's own label is common among its neighbours) are kept.

    Parameters
    ----------
    labels
        int labels ``(n_spots,)``.
    edge_index
        ``(2, E)`` neighbour pairs (source, target), e.g. from
        :func:`step.graph.build_spatial_graph`; edges need not be symmetric.

    Returns
    -------
    int64 labels of the same shape (a new array).
    """
    import scipy.sparse as sp

    labels = np.asarray(labels)
    if labels.ndim != 1:
        msg = f"labels must be 1-D, got shape {labels.shape}."
        raise ValueError(msg)
    codes, inverse = np.unique(labels, return_inverse=True)
    n = labels.shape[0]
    edges = np.asarray(edge_index.cpu() if hasattr(edge_index, "cpu") else edge_index)
    if edges.ndim != 2 or edges.shape[0] != 2:
        msg = f"edge_index must have shape (2, E), got {edges.shape}."
        raise ValueError(msg)
    src, dst = edges[0].astype(np.int64), edges[1].astype(np.int64)
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        msg = f"edge_index refers to nodes outside [0, {n})."
        raise ValueError(msg)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    votes = sp.csr_matrix((np.ones(src.size), (src, inverse[dst])), shape=(n, codes.size))
    votes.sum_duplicates()
    votes = votes.toarray()
    n_neighbours = votes.sum(axis=1)
    top = votes.argmax(axis=1)
    top_count = votes[np.arange(n), top]
    change = (top != inverse) & (top_count > n_neighbours / 2)
    out = inverse.copy()
    out[change] = top[change]
    return codes[out].astype(np.int64)
