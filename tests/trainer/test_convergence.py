"""The convergence probe: stop once the embedding's clustering stops changing."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from step.functionality.comps.trainer import ConvergenceProbe, Trainer, make_loaders
from step.utils.dataset import ScDataset

from ._toy import ToyVAE, toy_counts


def _setup(seed: int = 0):
    x = toy_counts(240, seed=seed).numpy().astype(np.float32)
    dataset = ScDataset(ad.AnnData(sp.csr_matrix(x)))
    trainer = Trainer(ToyVAE(dropout=0.0), seed=seed, verbose=False, early_stopping=False)
    trainer.init_optimizer(lr=1e-2)
    return dataset, trainer


@pytest.mark.parametrize("method", ["kmeans", "leiden"])
def test_probe_stops_once_clusters_are_stable(method: str) -> None:
    dataset, trainer = _setup()
    probe = ConvergenceProbe(dataset, every=2, threshold=0.9, patience=2, method=method,
                             n_clusters=3, resolution=0.1)
    trainer.callbacks.append(probe)
    stopped = trainer.train_batch(60, make_loaders(dataset, 32, split_rate=0.0, seed=0))
    history = trainer.history

    assert stopped and "stable" in trainer.stop_reason
    assert len(history) < 60
    # probed every second epoch; the first probe has nothing to compare with
    probed = history["probe_ari"].dropna()
    assert list(probed.index) == list(range(3, len(history), 2))
    assert probed.tolist() == probe.aris
    assert (probed.iloc[-2:] >= 0.9).all()
    assert len(history) % 2 == 0  # it stopped at a probe


def test_probe_does_not_stop_while_clusters_change() -> None:
    dataset, trainer = _setup()
    # an unreachable streak: the loop runs all epochs and records every probe
    probe = ConvergenceProbe(dataset, every=3, threshold=0.9, patience=50, n_clusters=3)
    trainer.callbacks.append(probe)
    stopped = trainer.train_batch(12, make_loaders(dataset, 32, split_rate=0.0, seed=0))
    assert not stopped and len(trainer.history) == 12
    assert trainer.history["probe_ari"].notna().sum() == 3  # epochs 6, 9, 12


def test_probe_checks_its_options() -> None:
    with pytest.raises(ValueError, match="threshold"):
        ConvergenceProbe(None, threshold=0.0)
    with pytest.raises(ValueError, match="every"):
        ConvergenceProbe(None, every=0)
