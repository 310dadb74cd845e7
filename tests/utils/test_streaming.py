"""Embeddings streamed from counts on disk into an .h5ad file equal the in-memory ones."""

from __future__ import annotations


import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from step.utils import OnDiskDataset, ScDataset, embed_to_h5ad
from step.workflows import scModel

SMALL = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "latent_dim": 8, "dropout": 0.0}



@pytest.fixture(scope="module")
def pbmc_files(tmp_path_factory, _pbmc_counts_session, write_store):
    root = tmp_path_factory.mktemp("streaming")
    adata = _pbmc_counts_session.copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.layers["counts"] = adata.X.copy()
    return adata, write_store(adata, root / "pbmc.h5ad"), write_store(adata, root / "pbmc.zarr")


@pytest.fixture(scope="module")
def trained(pbmc_files):
    """A model trained briefly in memory, and its in-memory embedding."""
    torch.set_num_threads(1)
    adata = pbmc_files[0].copy()
    model = scModel(adata, seed=0, **SMALL)
    model.run(epochs=2, batch_size=64, verbose=False)
    return model, adata.obsm["X_rep"]


@pytest.mark.parametrize("source", ["memory", "h5ad", "zarr"])
def test_write_obs_of_roots_and_views_matches_their_obs(pbmc_files, tmp_path, source):
    adata = pbmc_files[0]
    dataset = ScDataset(adata) if source == "memory" else \
        OnDiskDataset(pbmc_files[1 if source == "h5ad" else 2])
    views = {"root": (dataset, None), "consecutive": (dataset.subset(np.arange(100, 350)), None),
             "scattered": (dataset.subset(np.arange(0, 700, 7)), None),
             "rows of a view": (dataset.subset(np.arange(50, 650)), slice(20, 90)),
             "rows of the root": (dataset, slice(5, 40))}
    with h5py.File(tmp_path / "obs.h5", "w") as file:
        for name, (view, rows) in views.items():
            view.write_obs(file, name, rows=rows)
        with pytest.raises(ValueError, match="step 1"):
            dataset.write_obs(file, "bad", rows=slice(0, 10, 2))
        for name, (view, rows) in views.items():
            expected = view.obs if rows is None else view.obs.iloc[rows]
            pd.testing.assert_frame_equal(ad.io.read_elem(file[name]), expected)


@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_streamed_embedding_equals_the_in_memory_one(pbmc_files, trained, tmp_path, kind,
                                                     layer):
    adata, paths = pbmc_files[0], pbmc_files[1:]
    model, expected = trained
    out = embed_to_h5ad(model.model, OnDiskDataset(paths[kind - 1], layer=layer),
                        tmp_path / "result.h5ad", batch_size=96, copy_counts=True)
    result = ad.read_h5ad(out)
    assert result.obsm["X_rep"].dtype == np.float32
    np.testing.assert_allclose(result.obsm["X_rep"], expected, rtol=1e-5, atol=1e-6)
    assert result.obs.equals(adata.obs)
    assert list(result.var_names) == list(adata.var_names)
    counts = result.X if layer is None else result.layers[layer]
    assert sp.issparse(counts) and (counts != adata.X).nnz == 0


def test_without_copy_the_file_holds_no_counts_and_blocks_fill_every_row(pbmc_files, trained,
                                                                          tmp_path):
    model, expected = trained
    dataset = OnDiskDataset(pbmc_files[1])
    path = embed_to_h5ad(model.model, dataset, tmp_path / "r.h5ad", batch_size=128,
                         outputs={"X_rep": "embed", "X_twice": "embed"})
    with h5py.File(path, "r") as file:
        assert "X" not in file
        assert file["obsm/X_rep"].chunks[0] == 128
    result = ad.read_h5ad(path)
    assert result.X is None and result.n_obs == len(expected)
    np.testing.assert_allclose(result.obsm["X_twice"], result.obsm["X_rep"])
    np.testing.assert_allclose(result.obsm["X_rep"], expected, rtol=1e-5, atol=1e-6)


def test_append_adds_keys_to_an_existing_result(pbmc_files, trained, tmp_path):
    model, expected = trained
    dataset = OnDiskDataset(pbmc_files[1])
    path = embed_to_h5ad(model.model, dataset, tmp_path / "r.h5ad", uns={"note": "kept"})
    embed_to_h5ad(model.model, dataset, path, outputs={"X_again": "embed"}, append=True)
    result = ad.read_h5ad(path)
    assert set(result.obsm) == {"X_rep", "X_again"} and result.uns["note"] == "kept"
    np.testing.assert_allclose(result.obsm["X_again"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="holds 700 cells, the dataset 100"):
        embed_to_h5ad(model.model, dataset.subset(np.arange(100)), path, append=True)


def test_copy_counts_needs_one_file_in_its_own_order(pbmc_files, trained, tmp_path):
    adata, h5ad_path, _ = pbmc_files
    model = trained[0]
    out = tmp_path / "r.h5ad"
    with pytest.raises(ValueError, match="over one .h5ad file"):
        embed_to_h5ad(model.model, ScDataset(adata), out, copy_counts=True)
    with pytest.raises(ValueError, match="over 2 files"):
        embed_to_h5ad(model.model, OnDiskDataset([h5ad_path, h5ad_path]), out,
                      obs=adata.obs.iloc[np.r_[0:700, 0:700]].reset_index(drop=True),
                      copy_counts=True)
    with pytest.raises(ValueError, match="all of the file's cells"):
        embed_to_h5ad(model.model, OnDiskDataset(h5ad_path).subset(np.arange(50)), out,
                      obs=adata.obs.iloc[:50], copy_counts=True)
    assert not out.exists()


def test_non_finite_outputs_remove_the_file(pbmc_files, tmp_path):
    adata = pbmc_files[0]
    model = scModel(adata.copy(), seed=0, **SMALL).model
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    out = tmp_path / "r.h5ad"
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        embed_to_h5ad(model, OnDiskDataset(pbmc_files[1]), out)
    assert not out.exists()
