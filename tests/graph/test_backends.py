"""Optional compiled backends; each test runs only where its package is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step.graph import WITH_PYG_LIB, WITH_TORCH_CLUSTER, NeighborSampler, build_spatial_graph

from ._helpers import check_graph, edge_keys, grid_sections


def test_flags_are_booleans() -> None:
    assert isinstance(WITH_PYG_LIB, bool)
    assert isinstance(WITH_TORCH_CLUSTER, bool)


@pytest.mark.skipif(not WITH_TORCH_CLUSTER, reason="torch_cluster is not installed")
def test_torch_cluster_knn_matches_scipy() -> None:
    coords, labels = grid_sections(jitter=0.2, seed=8)
    codes = np.unique(labels, return_inverse=True)[1]
    fast = build_spatial_graph(coords, labels, k=6, backend="torch_cluster")
    check_graph(fast, coords.shape[0], codes)
    slow = build_spatial_graph(coords, labels, k=6, backend="scipy")
    assert torch.equal(fast, slow)


@pytest.mark.pyglib
@pytest.mark.skipif(not WITH_PYG_LIB, reason="pyg-lib is not installed")
def test_pyg_lib_sampler_follows_the_contract() -> None:
    coords, labels = grid_sections(n_sections=2, jitter=0.2, seed=9)
    n = coords.shape[0]
    edge_index = build_spatial_graph(coords, labels, k=6)
    sampler = NeighborSampler(
        edge_index, n, num_neighbors=(3, 2), batch_size=40, seed=0, backend="pyg_lib"
    )
    assert sampler.backend == "pyg_lib"
    full = edge_keys(edge_index, n)
    seeds = []
    for data in sampler:
        node_index, local = data.node_index, data.edge_index
        assert torch.unique(node_index).numel() == node_index.numel()
        assert data.seed_mask[: data.n_seed].all() and data.seed_mask.sum() == data.n_seed
        assert np.isin(edge_keys(node_index[local], n), full).all()
        real = local[0] != local[1]
        per_target = torch.bincount(local[1][real], minlength=data.num_nodes)
        assert per_target[: data.n_seed].max() <= 3
        loops = local[0][~real]
        assert torch.equal(
            torch.bincount(loops, minlength=data.num_nodes),
            torch.ones(data.num_nodes, dtype=torch.long),
        )
        seeds.append(node_index[: data.n_seed])
    assert torch.equal(torch.sort(torch.cat(seeds)).values, torch.arange(n))
