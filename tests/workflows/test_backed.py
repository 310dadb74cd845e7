"""scModel on an AnnData opened with backed="r": trained from the file, as from memory."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from step.utils.ondisk import OnDiskDataset
from step.workflows import scModel

TINY = {"hidden_dim": 16, "n_modules": 8, "module_dim": 8}


@pytest.fixture
def pbmc_h5ad(pbmc_counts: ad.AnnData, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pbmc_counts.write_h5ad(path)
    return path, pbmc_counts


def test_backed_training_equals_in_memory_training(pbmc_h5ad, tmp_path):
    path, adata = pbmc_h5ad
    kw = {"batch_key": "phase", "class_key": "bulk_labels", **TINY}
    memory = scModel(adata.copy(), **kw)
    backed_adata = ad.read_h5ad(path, backed="r")
    backed = scModel(backed_adata, **kw)
    assert isinstance(backed.dataset, OnDiskDataset) and backed.genes == memory.genes
    h_mem, h_disk = memory.run(epochs=2, verbose=False), backed.run(epochs=2, verbose=False)
    cols = [c for c in h_mem.columns if c.endswith("loss")]
    np.testing.assert_allclose(h_disk[cols].to_numpy(float), h_mem[cols].to_numpy(float),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(backed_adata.obsm["X_rep"], memory.adata.obsm["X_rep"], atol=1e-6)
    backed.refine(epochs=1, verbose=False)
    assert backed_adata.obsm["X_anchord"].shape[0] == adata.n_obs

    backed.save(tmp_path / "model")
    loaded = scModel.load(tmp_path / "model", ad.read_h5ad(path, backed="r"))
    assert isinstance(loaded.dataset, OnDiskDataset)
    assert loaded.dataset.batch_categories == backed.dataset.batch_categories
    np.testing.assert_allclose(loaded.embed(), backed.embed(), atol=1e-6)



def test_backed_gene_selection_equals_in_memory_selection(pbmc_h5ad):
    path, adata = pbmc_h5ad
    memory = scModel(adata.copy(), n_top_genes=50, batch_key="phase", **TINY)
    backed = scModel(ad.read_h5ad(path, backed="r"), n_top_genes=50, batch_key="phase", **TINY)
    assert backed.genes == memory.genes and backed.dataset.n_genes == 50
