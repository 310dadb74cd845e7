"""The fixed clustering protocol of the single-cell quality benchmarks.

One kNN graph (scanpy ``neighbors``, 15 neighbours) per embedding, then Leiden (igraph
flavour, 2 iterations, undirected) at fixed resolutions, at the resolution that gives the
number of labels (found by bisection without looking at the labels), and over a grid of
resolutions (whose best ARI is an optimistic upper bound, shown for reference only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from step.workflows._cluster import leiden_for_n_clusters, neighbor_graph

N_NEIGHBORS = 15
FIXED_RESOLUTIONS = (0.5, 1.0)
GRID = tuple(round(0.1 * i, 1) for i in range(1, 21))

#: Result keys, in report order: (key prefix, label).
RULES = (("r05", "resolution 0.5"), ("r10", "resolution 1.0"), ("k", "10 clusters"))


def leiden(graph: Any, resolution: float, seed: int) -> np.ndarray:
    """Leiden labels of a scanpy neighbour graph at one resolution."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.leiden(graph, resolution=resolution, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False, key_added="c")
    return graph.obs["c"].to_numpy()


def _agreement(truth: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return (float(adjusted_rand_score(truth, labels)),
            float(normalized_mutual_info_score(truth, labels)))


def score(rep: np.ndarray, truth: Sequence[Any], seed: int, *,
          grid: bool = True) -> dict[str, Any]:
    """ARI/NMI of one embedding against ``truth`` under every rule of the protocol.

    Keys: ``ari_r05``/``nmi_r05`` (resolution 0.5), ``ari_r10``/``nmi_r10`` (1.0),
    ``ari_k``/``nmi_k`` with ``res_k``, ``n_clusters_k`` and ``exact_k`` (the number of
    labels by bisection; ``exact_k`` is false when no resolution gave exactly that count
    and the closest count was kept), ``n_clusters_r05``/``n_clusters_r10``, and
    ``ari_best``/``res_best`` (best over the grid 0.1 .. 2.0) when ``grid``.
    """
    truth = np.asarray(truth)
    rep = np.asarray(rep, dtype=np.float32)
    n_labels = len(np.unique(truth))
    graph = neighbor_graph(rep, n_neighbors=N_NEIGHBORS, seed=seed)
    out: dict[str, Any] = {}
    for key, res in zip(("r05", "r10"), FIXED_RESOLUTIONS):
        labels = leiden(graph, res, seed)
        out[f"ari_{key}"], out[f"nmi_{key}"] = _agreement(truth, labels)
        out[f"n_clusters_{key}"] = len(np.unique(labels))
    labels, res = leiden_for_n_clusters(rep, n_labels, n_neighbors=N_NEIGHBORS, seed=seed)
    out["ari_k"], out["nmi_k"] = _agreement(truth, labels)
    out["res_k"] = float(res)
    out["n_clusters_k"] = len(np.unique(labels))
    out["exact_k"] = out["n_clusters_k"] == n_labels
    if grid:
        scan = [(_agreement(truth, leiden(graph, r, seed))[0], r) for r in GRID]
        out["ari_best"], out["res_best"] = max(scan)
    return out
