"""Graph-batch and node-sampler loops on spatial sections built from real PBMCs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch_geometric.loader import DataLoader as GraphLoader

from step.datasets import spatial_sections_from_cells
from step.functionality.comps.trainer import Trainer, seed_everything
from step.graph import NeighborSampler, build_spatial_graph, section_graphs
from step.models import TranscriptFormer
from step.utils.dataset import StDataset

SMALL = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "n_heads": 2}


@pytest.fixture(scope="module")
def sections():
    adata = spatial_sections_from_cells(n_sections=2, grid=(24, 24), seed=1)
    ds = StDataset(adata, batch_key="section")
    edge_index = build_spatial_graph(ds.spatial, ds.section_codes, k=6)
    return adata, ds, edge_index


def _split(n, seed=0):
    valid = np.sort(np.random.default_rng(seed).choice(n, n // 10, replace=False))
    return np.setdiff1d(np.arange(n), valid), valid


def _domain_ari(adata, emb):
    labels = KMeans(adata.obs["domain_true"].nunique(), n_init=10, random_state=0).fit_predict(emb)
    return adjusted_rand_score(adata.obs["domain_true"], labels)


def _smoothed(model, ds, graphs):
    out = np.zeros((len(ds), model.latent_dim), np.float32)
    model.eval()
    with torch.no_grad():
        for g in graphs:
            out[g.node_index.numpy()] = model.embed_graph(ds[g.node_index], g.edge_index).numpy()
    return out


def test_two_stage_graph_batch_training(sections):
    adata, ds, edge_index = sections
    seed_everything(0)
    model = TranscriptFormer(ds.n_genes, **SMALL)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=3e-3)
    trainer.train_batch(12, trainer.make_loaders(ds, 128, seed=0))
    unsmoothed = trainer.predict(ds)

    model.init_smoother_with_builtin(residual=False)
    trainer.init_optimizer(lr=3e-3, tune_lr=3e-4, stage=2)
    trainer.set_lr_scheduler(kind="constant")
    graphs = section_graphs(edge_index, ds.section_codes)
    train_ind, valid_ind = _split(len(ds))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_graph_batch(15, GraphLoader(graphs, batch_size=1, shuffle=True), ds,
                              train_ind, valid_ind)
    h = trainer.history[trainer.history["stage"] == 2]
    assert h["recon_loss"].iloc[-1] < h["recon_loss"].iloc[0]
    assert h["val_recon_loss"].iloc[-3:].min() < h["val_recon_loss"].iloc[0]
    assert (h["lr_head"] == 3e-3).all() and (h["lr_backbone"] == 3e-4).all()
    # the backbone learns in stage 2, at its smaller rate
    moved = {n: float((p.detach() - before[n]).abs().mean()) for n, p in model.named_parameters()
             if n in before}
    assert np.mean([v for n, v in moved.items() if n.startswith("transformer")]) > 0

    ari_raw = _domain_ari(adata, unsmoothed)
    ari_smooth = _domain_ari(adata, _smoothed(model, ds, graphs))
    print(f"domain ARI: unsmoothed {ari_raw:.3f}, smoothed {ari_smooth:.3f}")
    assert ari_smooth > ari_raw + 0.15, (ari_raw, ari_smooth)


def test_node_sampler_training_end_to_end(sections):
    adata, ds, edge_index = sections
    seed_everything(0)
    model = TranscriptFormer(ds.n_genes, **SMALL)
    model.init_smoother_with_builtin(residual=False)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=3e-3)
    train_ind, valid_ind = _split(len(ds))
    sampler = NeighborSampler(edge_index, len(ds), num_neighbors=(6, 4), batch_size=128,
                              seed=0, input_nodes=torch.as_tensor(train_ind))
    valid_sampler = NeighborSampler(edge_index, len(ds), num_neighbors=(6, 4), batch_size=256,
                                    shuffle=False, input_nodes=torch.as_tensor(valid_ind))
    trainer.train_node_sampler(6, sampler, ds, train_ind, valid_ind, valid_loader=valid_sampler,
                               valid_every=5)
    h = trainer.history
    assert {"recon_loss", "raw_recon_loss", "contrast_loss", "val_recon_loss"} <= set(h.columns)
    assert h["recon_loss"].iloc[-1] < h["recon_loss"].iloc[0]
    assert h["val_recon_loss"].iloc[-1] < h["val_recon_loss"].iloc[0]
    assert trainer.global_step == 6 * len(sampler)
    assert len(trainer.step_history) == trainer.global_step // 5
    assert all("val_recon_loss" in r for r in trainer.step_history)
    assert {"recon_loss", "contrast_loss", "total_loss"} <= set(trainer.early_stopping)


def test_graph_loops_reject_bad_input(sections):
    _, ds, edge_index = sections
    model = TranscriptFormer(ds.n_genes, **SMALL)
    trainer = Trainer(model, verbose=False)
    trainer.init_optimizer()
    with pytest.raises(ValueError, match="smoother"):
        trainer.init_optimizer(stage=2)
    graphs = section_graphs(edge_index, ds.section_codes)
    with pytest.raises(TypeError, match="node_index"):
        trainer.train_graph_batch(1, [torch.zeros(3)], ds)
    with pytest.raises(ValueError, match="share nodes"):
        trainer.train_graph_batch(1, graphs, ds, train_ind=[0, 1, 2], valid_ind=[2, 3])
