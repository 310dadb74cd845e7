"""The Trainer on the real model and the real PBMC counts."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from step.functionality.comps.trainer import Trainer, seed_everything
from step.functionality.comps.trainer._convergence import cluster_embedding
from step.models import TranscriptFormer
from step.utils.dataset import ScDataset


def test_train_batch_on_pbmc_learns_cell_types(pbmc_counts):
    seed_everything(0)
    ds = ScDataset(pbmc_counts, class_key="bulk_labels")
    model = TranscriptFormer(ds.n_genes, hidden_dim=32, n_modules=16, module_dim=16, n_heads=2)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=3e-3)
    trainer.train_batch(40, trainer.make_loaders(ds, 128, obs_key="bulk_labels", seed=0))
    h = trainer.history
    assert h["val_recon_loss"].iloc[-1] < 0.85 * h["val_recon_loss"].iloc[0]

    emb = trainer.predict(ds)
    assert np.array_equal(emb, trainer.predict(ds))  # the posterior mean, not a sample
    labels = pbmc_counts.obs["bulk_labels"].to_numpy()
    ari = adjusted_rand_score(labels, cluster_embedding(emb, None, "leiden", resolution=0.5))
    rng = np.random.default_rng(0)
    random_ari = np.mean([adjusted_rand_score(labels, rng.permutation(labels)) for _ in range(5)])
    print(f"Leiden ARI vs bulk_labels: {ari:.3f} (shuffled labels: {random_ari:.3f})")
    assert ari > 0.12 and ari > random_ari + 0.1
