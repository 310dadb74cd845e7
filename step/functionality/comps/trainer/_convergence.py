"""Stop when the clustering of the embedding no longer changes between snapshots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from step.utils.threads import keep_torch_threads


def cluster_embedding(emb: np.ndarray, n_clusters: int | None, method: str, seed: int = 0,
                      resolution: float = 1.0) -> np.ndarray:
    """Cluster an embedding with k-means (``n_clusters``) or Leiden (kNN graph)."""
    if method == "kmeans":
        if not n_clusters:
            msg = "k-means clustering needs n_clusters."
            raise ValueError(msg)
        return KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(emb)
    if method == "leiden":
        import anndata as ad
        import scanpy as sc

        tmp = ad.AnnData(np.zeros((len(emb), 0), dtype=np.float32))
        tmp.obsm["X_emb"] = emb
        with keep_torch_threads():
            sc.pp.neighbors(tmp, use_rep="X_emb", random_state=seed)
        sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False)
        return tmp.obs["leiden"].to_numpy()
    msg = f"method must be 'kmeans' or 'leiden', got {method!r}."
    raise ValueError(msg)


class ConvergenceProbe:
    """A callback that stops training once the embedding's clusters stop changing.

    Every ``every`` epochs the dataset is embedded and clustered; the ARI between this
    clustering and the previous one is recorded in the history column ``probe_ari``. When
    it is at least ``threshold`` for ``patience`` probes in a row, training stops.

    Parameters
    ----------
    data
        The dataset to embed (anything :meth:`Trainer.predict` accepts).
    every
        Probe interval in epochs.
    threshold
        ARI between successive clusterings that counts as "unchanged".
    patience
        Successive unchanged probes needed to stop.
    method, n_clusters, resolution
        Clustering: ``"kmeans"`` with ``n_clusters`` or ``"leiden"`` at ``resolution``.
    """

    def __init__(self, data: Any, *, every: int = 5, threshold: float = 0.95,
                 patience: int = 2, method: str = "kmeans", n_clusters: int | None = 10,
                 resolution: float = 1.0, seed: int = 0) -> None:
        if every < 1 or patience < 1 or not 0 < threshold <= 1:
            msg = (f"need every >= 1, patience >= 1 and 0 < threshold <= 1; got {every}, "
                   f"{patience}, {threshold}.")
            raise ValueError(msg)
        self.data, self.every, self.threshold, self.patience = data, every, threshold, patience
        self.method, self.n_clusters, self.resolution, self.seed = (
            method, n_clusters, resolution, seed)
        self.previous: np.ndarray | None = None
        self.streak = 0
        self.aris: list[float] = []

    def on_train_start(self, resumed: bool = False) -> None:
        if not resumed:
            self.previous, self.streak = None, 0

    def state_dict(self) -> dict[str, Any]:
        """The last clustering, the streak and the ARIs, for checkpoints."""
        previous = None if self.previous is None else torch.from_numpy(
            pd.factorize(np.asarray(self.previous, dtype=object))[0].astype(np.int64))
        return {"previous": previous, "streak": self.streak, "aris": list(self.aris)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        prev = state["previous"]
        self.previous = None if prev is None else prev.numpy()
        self.streak, self.aris = int(state["streak"]), [float(a) for a in state["aris"]]

    def on_train_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        if (epoch + 1) % self.every:
            return
        labels = cluster_embedding(trainer.predict(self.data), self.n_clusters, self.method,
                                   self.seed, self.resolution)
        if self.previous is not None:
            ari = float(adjusted_rand_score(self.previous, labels))
            self.aris.append(ari)
            logs["probe_ari"] = ari
            self.streak = self.streak + 1 if ari >= self.threshold else 0
            if self.streak >= self.patience:
                trainer.request_stop(
                    f"the embedding's clustering is stable (ARI >= {self.threshold} between "
                    f"{self.patience + 1} successive probes)")
        self.previous = labels
