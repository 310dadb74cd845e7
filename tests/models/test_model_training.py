"""TranscriptFormer learns the real PBMC counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from step._constants import LOSS_KEYS
from step.models import TranscriptFormer, log_nb

SMALL = dict(n_modules=16, module_dim=16, hidden_dim=32, n_layers=1, n_heads=2, dropout=0.0)


@pytest.fixture
def one_thread():
    """Run single-threaded: on a shared, busy machine intra-op threads that
    spin-wait for each other make small-batch training many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _knn_accuracy(rep: np.ndarray, labels: np.ndarray) -> float:
    return float(cross_val_score(KNeighborsClassifier(10), rep, labels, cv=5).mean())


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_recon_loss_falls_on_pbmc_counts(pbmc_counts: ad.AnnData) -> None:
    torch.manual_seed(0)
    x = torch.as_tensor(pbmc_counts.X.toarray(), dtype=torch.float32)
    library = x.sum(1)
    everything = {"x": x, "library": library}
    model = TranscriptFormer(x.shape[1], likelihood="nb", **SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_recon() -> float:
        model.eval()
        with torch.no_grad():
            value = float(model.loss(everything)[LOSS_KEYS.RECON])
        model.train()
        return value

    before = eval_recon()
    gen = torch.Generator().manual_seed(0)
    trace = []
    for _ in range(300):
        rows = torch.randint(0, x.shape[0], (128,), generator=gen)
        terms = model.loss({"x": x[rows], "library": library[rows]})
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        trace.append(float(terms[LOSS_KEYS.RECON].detach()))
    after = eval_recon()

    assert np.isfinite(trace).all()
    assert np.mean(trace[-20:]) < 0.8 * np.mean(trace[:20])
    assert after < 0.8 * before

    # Better than the same likelihood with cell-independent gene proportions:
    # the latent code carries information about each cell.
    proportions = x.sum(0) / x.sum()
    theta = model.decoder.log_theta.detach().exp()
    baseline = float(-log_nb(x, library[:, None] * proportions, theta).sum(1).mean())
    assert after < 0.95 * baseline

    # The mean embedding separates the published cell clusters.
    model.eval()
    with torch.no_grad():
        trained = model.embed(everything).numpy()
    labels = pbmc_counts.obs["louvain"].cat.codes.to_numpy()
    assert _knn_accuracy(trained, labels) > 0.7
