"""scModel with several batches: the batch embedding is used and batches mix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from step._constants import ADATA_KEYS
from step.workflows import scModel

from ._metrics import SMALL, batch_mixing_entropy, leiden_ari_scan, pca_embedding

#: The second batch has half the sequencing depth ...
DEPTH = 0.5
#: ... and every gene scaled by a log-normal factor with this spread.
GENE_EFFECT_SD = 0.7


def two_batches(adata: ad.AnnData, seed: int = 0) -> ad.AnnData:
    """Assign cells at random to two batches; redraw the counts of the second one as
    ``Poisson(counts * DEPTH * gene_factor)`` (a depth shift plus gene-specific effects)."""
    rng = np.random.default_rng(seed)
    shifted = rng.random(adata.n_obs) < 0.5
    counts = np.asarray(adata.X.toarray(), dtype=np.float64)
    factor = np.exp(rng.normal(0.0, GENE_EFFECT_SD, adata.n_vars))
    counts[shifted] = rng.poisson(counts[shifted] * DEPTH * factor)
    out = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=adata.obs.copy(),
                     var=adata.var.copy())
    out.obs["batch"] = np.where(shifted, "shifted", "reference")
    return out


def _train(adata: ad.AnnData, batch_key: str | None) -> scModel:
    model = scModel(adata, batch_key=batch_key, class_key="bulk_labels", seed=0,
                    **{**SMALL, "kl_weight": 0.3, "latent_dim": 10})
    model.run(epochs=60, batch_size=32, verbose=False,
              key_added="X_rep" if batch_key else "X_no_batch_key")
    return model


@pytest.mark.slow
def test_batches_mix_and_labels_stay_apart(pbmc_counts: ad.AnnData) -> None:
    adata = two_batches(pbmc_counts)
    batches = adata.obs["batch"].to_numpy()
    labels = adata.obs["bulk_labels"].to_numpy()

    model = _train(adata, "batch")
    assert model.dataset.n_batches == 2
    assert model.model.batch_embedding is not None
    assert model.model.batch_embedding.num_embeddings == 2
    rep = adata.obsm[ADATA_KEYS.X_REP]
    mixing = batch_mixing_entropy(rep, batches)
    ari, _, _ = leiden_ari_scan(rep, labels)

    _train(adata, None)  # the same model without the batch key, for contrast
    plain = adata.obsm["X_no_batch_key"]
    mixing_plain = batch_mixing_entropy(plain, batches)
    ari_plain, _, _ = leiden_ari_scan(plain, labels)
    pca = pca_embedding(adata)
    mixing_pca = batch_mixing_entropy(pca, batches)
    ari_pca, _, _ = leiden_ari_scan(pca, labels)
    report = (f"batch mixing entropy (1 = random): with batch key {mixing:.3f}, without "
              f"{mixing_plain:.3f}, PCA {mixing_pca:.3f}; best-resolution label ARI: with "
              f"batch key {ari:.3f}, without {ari_plain:.3f}, PCA {ari_pca:.3f}")
    print(report)
    assert mixing > 0.75, report
    assert mixing > mixing_plain + 0.4 and mixing > mixing_pca + 0.3, report
    assert ari > 0.5 and ari > ari_pca + 0.1 and ari > ari_plain, report

    # the decoder reads the batch: the same cells decoded as the other batch change
    model.model.eval()
    inputs = model.dataset[np.arange(8)]
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
