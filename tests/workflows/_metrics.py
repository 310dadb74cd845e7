"""Reference embeddings and scores used by the workflow tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from step.workflows._cluster import _leiden, leiden_for_n_clusters, neighbor_graph

#: A small architecture that trains in seconds on one core.
SMALL = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "latent_dim": 16,
         "dropout": 0.0}
#: The Leiden resolutions scanned by :func:`leiden_ari_scan` (0.1, 0.2, ..., 2.0).
RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))


def pca_embedding(adata: ad.AnnData, n_comps: int = 50) -> np.ndarray:
    """50 principal components of the log-normalised counts (the standard baseline)."""
    tmp = ad.AnnData(adata.X.copy())
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    sc.pp.pca(tmp, n_comps=n_comps, random_state=0)
    return np.asarray(tmp.obsm["X_pca"])


def leiden_ari(rep: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """ARI of Leiden clusters against ``labels``, at the resolution whose number of
    clusters is closest to the number of labels (the same rule for every embedding)."""
    n_labels = len(np.unique(labels))
    clusters, _ = leiden_for_n_clusters(rep, n_labels, n_neighbors=15, seed=0)
    return float(adjusted_rand_score(labels, clusters)), len(np.unique(clusters))


def leiden_ari_at(rep: np.ndarray, labels: np.ndarray,
                  resolutions: tuple[float, ...]) -> list[tuple[float, int]]:
    """ARI of Leiden clusters against ``labels`` at each of some fixed resolutions (one
    graph of 15 neighbours, seed 0), with the number of clusters."""
    graph = neighbor_graph(np.asarray(rep, dtype=np.float32), n_neighbors=15, seed=0)
    out = []
    for resolution in resolutions:
        clusters = _leiden(graph, resolution, 0)
        out.append((float(adjusted_rand_score(labels, clusters)), len(np.unique(clusters))))
    return out


def leiden_ari_scan(rep: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """Best ARI of Leiden clusters against ``labels`` over :data:`RESOLUTIONS` (the
    optimal-resolution rule of integration benchmarks), with its resolution and number
    of clusters. The same graph construction (15 neighbours) for every embedding."""
    graph = neighbor_graph(np.asarray(rep, dtype=np.float32), n_neighbors=15, seed=0)
    best = (-1.0, 0.0, 0)
    for resolution in RESOLUTIONS:
        clusters = _leiden(graph, resolution, 0)
        score = float(adjusted_rand_score(labels, clusters))
        if score > best[0]:
            best = (score, resolution, len(np.unique(clusters)))
    return best


def batch_mixing_entropy(rep: np.ndarray, batches: np.ndarray, k: int = 30) -> float:
    """Mean entropy of the batches among each cell's ``k`` nearest neighbours, divided by
    the entropy of the overall batch proportions (1: as mixed as random, 0: separated)."""
    codes = np.unique(np.asarray(batches), return_inverse=True)[1]
    n_batches = codes.max() + 1
    overall = np.bincount(codes, minlength=n_batches) / len(codes)
    reference = -(overall * np.log(overall)).sum()
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(rep).kneighbors(
        rep, return_distance=False)[:, 1:]
    counts = np.stack([np.bincount(codes[row], minlength=n_batches) for row in neighbours])
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(entropy.mean() / reference)
