"""Embedding quality of a model trained from disk versus the same model trained in
memory, on the PBMC counts written to an ``.h5ad`` file.

Both runs use the same seed; the in-memory run reads ``anndata.read_h5ad(path)`` and
writes ``obsm["X_rep"]``, the on-disk run reads ``read_h5ad(path, backed="r")``, trains
with ``run(key_added=None)`` and streams its embedding into a result file with
:func:`step.utils.embed_to_h5ad`. Each embedding is clustered with scanpy (kNN graph,
k = 15) and Leiden at resolution 0.5 (igraph, ``random_state=seed``) and scored by the
adjusted Rand index against ``bulk_labels``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

LABEL_KEY = "bulk_labels"
RESOLUTION = 0.5


def leiden_ari(rep: np.ndarray, truth: np.ndarray, seed: int) -> tuple[float, int]:
    """ARI of Leiden clusters at :data:`RESOLUTION` (the quality benchmark's protocol) and
    the number of clusters."""
    from _leiden_protocol import N_NEIGHBORS, leiden
    from sklearn.metrics import adjusted_rand_score

    from step.workflows._cluster import neighbor_graph

    graph = neighbor_graph(np.asarray(rep, dtype=np.float32), n_neighbors=N_NEIGHBORS, seed=seed)
    labels = leiden(graph, RESOLUTION, seed)
    return float(adjusted_rand_score(truth, labels)), len(np.unique(labels))


def compare(seed: int, epochs: int) -> list[dict[str, Any]]:
    """One seed: a row for the in-memory and one for the on-disk run."""
    import anndata as ad
    import scipy.sparse as sp

    from step.datasets import pbmc68k_counts
    from step.utils import embed_to_h5ad
    from step.workflows import scModel

    counts = pbmc68k_counts()
    counts.X = sp.csr_matrix(counts.X)
    truth = counts.obs[LABEL_KEY].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbmc.h5ad"
        counts.write_h5ad(path)
        memory = ad.read_h5ad(path)
        scModel(memory, seed=seed).run(epochs=epochs, verbose=False)
        in_memory = np.asarray(memory.obsm["X_rep"])

        model = scModel(ad.read_h5ad(path, backed="r"), seed=seed)
        model.run(epochs=epochs, verbose=False, key_added=None)
        result = embed_to_h5ad(model.model, model.dataset, Path(tmp) / "result.h5ad")
        from_disk = np.asarray(ad.read_h5ad(result).obsm["X_rep"])
    diff = float(np.abs(from_disk - in_memory).max())
    rows = []
    for where, rep in (("memory", in_memory), ("disk", from_disk)):
        ari, n_clusters = leiden_ari(rep, truth, seed)
        rows.append({"seed": seed, "where": where, "ari": ari, "n_clusters": n_clusters,
                     "max_abs_diff": diff})
    return rows
