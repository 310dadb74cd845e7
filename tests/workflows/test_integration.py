"""scModel with several batches: the batch embedding is used and batches mix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from step._constants import ADATA_KEYS
from step.workflows import scModel

from ._metrics import SMALL, batch_mixing_entropy, leiden_ari, pca_embedding

#: A count-depth shift: the second batch keeps each molecule with this probability.
KEEP = 0.4


def two_batches(adata: ad.AnnData, seed: int = 0) -> ad.AnnData:
    """Assign cells at random to two batches and thin the counts of the second one."""
    rng = np.random.default_rng(seed)
    shifted = rng.random(adata.n_obs) < 0.5
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    rows = np.repeat(shifted, np.diff(counts.indptr))
    values = counts.data.astype(np.int64)
    values[rows] = rng.binomial(values[rows], KEEP)
    thinned = sp.csr_matrix((values.astype(np.float32), counts.indices, counts.indptr),
                            shape=counts.shape)
    thinned.eliminate_zeros()
    out = ad.AnnData(thinned, obs=adata.obs.copy(), var=adata.var.copy())
    out.obs["batch"] = np.where(shifted, "shallow", "deep")
    return out


@pytest.mark.slow
def test_batches_mix_and_labels_stay_apart(pbmc_counts: ad.AnnData) -> None:
    adata = two_batches(pbmc_counts)
    depth = np.asarray(adata.X.sum(1)).ravel()
    shallow = adata.obs["batch"].to_numpy() == "shallow"
    assert depth[shallow].mean() < 0.5 * depth[~shallow].mean()

    model = scModel(adata, batch_key="batch", class_key="bulk_labels", seed=0,
                    **{**SMALL, "kl_weight": 0.1, "latent_dim": 10})
    assert model.dataset.n_batches == 2
    assert model.model.batch_embedding is not None
    assert model.model.batch_embedding.num_embeddings == 2
    model.run(epochs=60, batch_size=32, verbose=False)

    rep = adata.obsm[ADATA_KEYS.X_REP]
    batches = adata.obs["batch"].to_numpy()
    labels = adata.obs["bulk_labels"].to_numpy()
    mixing = batch_mixing_entropy(rep, batches)
    mixing_pca = batch_mixing_entropy(pca_embedding(adata), batches)
    ari, _ = leiden_ari(rep, labels)
    report = (f"batch mixing entropy (1 = random): scModel {mixing:.3f}, PCA {mixing_pca:.3f};"
              f" label ARI {ari:.3f}")
    print(report)
    assert mixing > 0.9, report
    assert mixing > mixing_pca, report
    assert ari > 0.4, report

    # the decoder reads the batch: the same cell decoded as the other batch changes
    import torch

    model.model.eval()
    inputs = {k: v for k, v in model.dataset[np.arange(8)].items()}
    with torch.no_grad():
        z = model.model.embed(inputs)
        a = model.model.decode(z, inputs["library"], torch.zeros(8, dtype=torch.long))
        b = model.model.decode(z, inputs["library"], torch.ones(8, dtype=torch.long))
    assert not torch.allclose(a["log_mu"], b["log_mu"])


def test_refine_with_batches_tunes_the_batch_embedding(pbmc_counts: ad.AnnData) -> None:
    adata = two_batches(pbmc_counts)
    model = scModel(adata, batch_key="batch", class_key="bulk_labels", seed=0, **SMALL)
    model.run(epochs=2, batch_size=64, verbose=False)
    history = model.refine(epochs=2, lr=1e-3, tune_lr=1e-4, batch_size=64, verbose=False)
    groups = {g["name"]: g["lr"] for g in model.trainer.optimizer.param_groups}
    assert set(groups) == {"head", "backbone", "batch"}
    assert groups["batch"] == pytest.approx(groups["backbone"])
    assert "lr_batch" in history
    assert ADATA_KEYS.X_ANCHORED in adata.obsm


def test_embedding_other_data_maps_batches(pbmc_counts: ad.AnnData) -> None:
    adata = two_batches(pbmc_counts)
    model = scModel(adata, batch_key="batch", seed=0, **SMALL)
    model.run(epochs=1, batch_size=128, verbose=False)
    subset = adata[:50].copy()
    np.testing.assert_array_equal(model.embed(subset), model.embed()[:50])
    no_batch = subset.copy()
    del no_batch.obs["batch"]
    np.testing.assert_array_equal(model.embed(no_batch), model.embed()[:50])
    unknown = subset.copy()
    unknown.obs["batch"] = "new"
    with pytest.raises(ValueError, match="unknown to the model"):
        model.embed(unknown)
