"""scModel on data left on disk: paths of .h5ad files and .zarr stores, collections of
files with genes in other orders, streaming gene selection, and a file damaged while
training."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from step.utils.ondisk import OnDiskDataset, OnDiskReadError
from step.utils.preprocess import prepare_counts
from step.utils.streaming_hvg import highly_variable_from_blocks
from step.workflows import scModel

TINY = {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "dropout": 0.0}


@pytest.fixture
def two_files(pbmc_counts: ad.AnnData, tmp_path: Path, write_store):
    """The PBMCs split into an .h5ad file (genes as stored) and a .zarr store (genes
    reversed, one extra gene), with the concatenated data in memory."""
    adata = pbmc_counts.copy()
    adata.X = sp.csr_matrix(adata.X)
    first, second = adata[:400].copy(), adata[400:].copy()
    shuffled = second[:, second.var_names[::-1]].copy()
    extra = ad.AnnData(sp.csr_matrix(np.ones((shuffled.n_obs, 1), np.float32)),
                       obs=shuffled.obs[[]], var=pd.DataFrame(index=["EXTRA"]))
    shuffled = ad.concat([shuffled, extra], axis=1, merge="first")
    shuffled.obs = second.obs.copy()
    paths = [write_store(first, tmp_path / "first.h5ad"), write_store(shuffled, tmp_path / "second.zarr")]
    return paths, adata


def _losses(history: pd.DataFrame) -> np.ndarray:
    return history[[c for c in history.columns if c.endswith("loss")]].to_numpy(float)


def test_a_collection_of_an_h5ad_and_a_zarr_trains_like_the_data_in_memory(two_files):
    paths, adata = two_files
    kw = {"batch_key": "phase", "class_key": "bulk_labels", "seed": 2, **TINY}
    disk = scModel(paths, **kw)
    memory = scModel(adata.copy(), **kw)
    assert isinstance(disk.dataset, OnDiskDataset) and disk.genes == list(adata.var_names)
    assert disk.adata.X is None and disk.adata.n_obs == adata.n_obs
    pd.testing.assert_frame_equal(disk.adata.obs, adata.obs)
    h_disk = disk.run(epochs=3, block_size=16, verbose=False)
    h_mem = memory.run(epochs=3, block_size=16, verbose=False)
    np.testing.assert_allclose(_losses(h_disk), _losses(h_mem), rtol=0, atol=1e-5)
    np.testing.assert_allclose(disk.adata.obsm["X_rep"], memory.adata.obsm["X_rep"], atol=1e-5)
    assert h_disk["total_loss"].iloc[-1] < h_disk["total_loss"].iloc[0]


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_a_path_is_read_from_disk(pbmc_counts: ad.AnnData, tmp_path: Path, kind: str,
                                  write_store):
    adata = pbmc_counts[:300].copy()
    path = write_store(adata, tmp_path / f"cells.{kind}")
    model = scModel(path, **TINY)
    assert isinstance(model.dataset, OnDiskDataset) and model.dataset.files == [Path(path)]
    model.run(epochs=1, verbose=False)
    assert model.adata.obsm["X_rep"].shape == (300, model.model.config["latent_dim"])
    model.save(tmp_path / "saved")
    loaded = scModel.load(tmp_path / "saved", path)
    np.testing.assert_allclose(loaded.embed(), model.embed(), atol=1e-6)


@pytest.mark.parametrize("batch_key", [None, "phase"])
@pytest.mark.parametrize("n_top_genes", [50, 300])
def test_streaming_gene_selection_equals_the_in_memory_selection(pbmc_counts, tmp_path, write_store,
                                                                 batch_key, n_top_genes):
    path = write_store(pbmc_counts, tmp_path / "pbmc.h5ad")
    in_memory = prepare_counts(pbmc_counts, n_top_genes=n_top_genes, batch_key=batch_key,
                               flavor="seurat")
    dataset = OnDiskDataset(path)
    batches = None if batch_key is None else pbmc_counts.obs[batch_key].to_numpy()
    mask = highly_variable_from_blocks(dataset.iter_blocks(rows=97), dataset.var_names,
                                       n_top_genes, batches=batches)
    assert list(pbmc_counts.var_names[mask]) == list(in_memory.var_names)
    model = scModel(ad.read_h5ad(path, backed="r"), n_top_genes=n_top_genes,
                    batch_key=batch_key, **TINY)
    assert model.genes == list(in_memory.var_names)
    assert model.dataset.n_genes == n_top_genes


def test_given_genes_are_used_in_their_order(two_files):
    paths, adata = two_files
    genes = list(adata.var_names[[10, 3, 200, 7]])
    for data in (paths, adata.copy()):
        model = scModel(data, genes=genes, **TINY)
        assert model.genes == genes and model.dataset.n_genes == 4


def test_repeated_cell_names_across_files_are_refused(pbmc_counts, tmp_path, write_store):
    one = write_store(pbmc_counts[:100].copy(), tmp_path / "one.h5ad")
    again = write_store(pbmc_counts[50:150].copy(), tmp_path / "again.zarr")
    with pytest.raises(ValueError, match="repeat within or across the files") as err:
        scModel([one, again], **TINY)
    assert "one.h5ad" in str(err.value) and "again.zarr" in str(err.value)


class _Truncate:
    """Truncates ``path`` to a few bytes after optimizer step ``step`` (mid-epoch)."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, step: int) -> None:
        if step == self.step:
            os.truncate(self.path, 4096)


def test_a_file_truncated_while_training_is_named_and_the_run_resumes(pbmc_counts, tmp_path,
                                                                     write_store):
    adata = pbmc_counts[:320].copy()
    original = tmp_path / "original.h5ad"
    write_store(adata, original)
    path = tmp_path / "cells.h5ad"
    path.write_bytes(original.read_bytes())
    kw = {"epochs": 4, "batch_size": 32, "verbose": False}

    reference = scModel(str(original), **TINY)
    reference.run(checkpoint_dir=tmp_path / "ref", **kw)

    model = scModel(str(path), **TINY)
    checkpoints = tmp_path / "run"
    # 256 training cells: 8 steps per epoch; the file is cut in epoch 3
    with pytest.raises(OnDiskReadError, match="cells.h5ad"):
        model.run(checkpoint_dir=checkpoints, callbacks=[_Truncate(path, 19)], **kw)
    checkpoint = checkpoints / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["counters"]["epoch"] == 2

    path.write_bytes(original.read_bytes())  # the file is restored
    resumed = scModel(str(path), **TINY)
    history = resumed.run(checkpoint_dir=checkpoints, resume=checkpoint, **kw)
    pd.testing.assert_frame_equal(history.drop(columns="seconds"),
                                  reference.history.drop(columns="seconds"))
    np.testing.assert_array_equal(resumed.adata.obsm["X_rep"], reference.adata.obsm["X_rep"])
