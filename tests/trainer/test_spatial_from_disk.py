"""End-to-end spatial training from a curve-ordered store on disk matches training in memory."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from step.datasets import spatial_benchmark_case
from step.functionality.comps.trainer import Trainer, seed_everything
from step.graph import NeighborSampler, build_spatial_graph, spatial_order
from step.models import TranscriptFormer
from step.utils import OnDiskDataset, StDataset, write_in_order

SMALL = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "n_heads": 2}
STEPS = 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three sections of real cells, written in random row order, then in curve order."""
    adata = spatial_benchmark_case("patches_hex_sections", seed=0)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()
    root = tmp_path_factory.mktemp("spatial_disk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(root / "shuffled.h5ad")
    order = spatial_order(adata.obsm["spatial"], adata.obs["section"])
    h5ad = write_in_order(root / "shuffled.h5ad", root / "ordered.h5ad", order, chunk_rows=128)
    zarr = write_in_order(root / "shuffled.h5ad", root / "ordered.zarr", order, chunk_rows=128)
    return ad.read_h5ad(h5ad), h5ad, zarr


def _train(dataset, edge_index, train_ind):
    seed_everything(0)
    model = TranscriptFormer(dataset.n_genes, **SMALL)
    model.init_smoother_with_builtin(residual=False)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=3e-3)
    sampler = NeighborSampler(edge_index, len(dataset), num_neighbors=(6, 4), batch_size=64,
                              seed=0, input_nodes=train_ind, seed_block_size=16,
                              sections=dataset.batch_codes)
    batches = []
    trainer.train_node_sampler(STEPS, sampler, dataset, train_ind, max_steps=1)
    for d in NeighborSampler(edge_index, len(dataset), num_neighbors=(6, 4), batch_size=64,
                             seed=0, input_nodes=train_ind, seed_block_size=16,
                             sections=dataset.batch_codes):
        batches.append(dataset[d.node_index])
        if len(batches) == 2:
            break
    return trainer, batches


def test_training_from_disk_matches_memory(stores):
    adata, h5ad, zarr = stores
    memory = StDataset(adata, batch_key="section", spatial_key="spatial")
    edge_index = build_spatial_graph(memory.spatial, memory.section_codes, method="hex")
    train_ind = np.flatnonzero(np.arange(len(memory)) % 5 != 0)
    ref, ref_batches = _train(memory, edge_index, train_ind)
    for path in (h5ad, zarr):
        disk = OnDiskDataset(path, batch_key="section", spatial_key="spatial")
        assert np.array_equal(disk.spatial, memory.spatial)
        # the graph and the sampler are built from what the store holds
        assert torch.equal(build_spatial_graph(disk.spatial, disk.batch_codes, method="hex"), edge_index)
        got, batches = _train(disk, edge_index, train_ind)
        for a, b in zip(batches, ref_batches, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        h, h_ref = got.history, ref.history
        assert len(h) == STEPS and h["recon_loss"].nunique() == STEPS
        np.testing.assert_allclose(h["recon_loss"], h_ref["recon_loss"], rtol=1e-5)
        np.testing.assert_allclose(h["total_loss"], h_ref["total_loss"], rtol=1e-5)
        for (name, p), (_, q) in zip(got.model.named_parameters(), ref.model.named_parameters(),
                                     strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
