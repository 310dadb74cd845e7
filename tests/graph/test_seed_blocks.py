"""Block-shuffled seeds: every seed once per epoch, runs of consecutive ids, few row ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step.datasets import spatial_benchmark_case
from step.graph import NeighborSampler, RandomNodeSampler, build_spatial_graph, spatial_order
from step.utils import contiguous_runs


@pytest.fixture(scope="module")
def ordered_graph():
    """A hexagonal section of real cells: its graph in random row order and in curve order."""
    adata = spatial_benchmark_case("cortex_hex", seed=0)
    coords = adata.obsm["spatial"][np.random.default_rng(0).permutation(adata.n_obs)]
    random_edges = build_spatial_graph(coords, method="hex")
    curve_edges = build_spatial_graph(coords[spatial_order(coords)], method="hex")
    return random_edges, curve_edges, adata.n_obs


def _ranges(sampler) -> list[int]:
    return [len(contiguous_runs(np.unique(d.node_index.numpy()))) for d in sampler]


def test_block_seeds_cover_every_seed_once_in_runs(ordered_graph):
    _, edges, n = ordered_graph
    train = torch.arange(n)[torch.arange(n) % 10 != 0]
    sampler = NeighborSampler(edges, n, num_neighbors=(4,), batch_size=64, seed=0,
                              input_nodes=train, seed_block_size=16)
    epochs = []
    for _ in range(2):
        items = list(sampler)
        seeds = torch.cat([d.node_index[: d.n_seed] for d in items])
        assert torch.equal(torch.sort(seeds).values, train)
        epochs.append(seeds)
        # a batch of 64 seeds is at most 5 runs of consecutive training seeds
        for d in items:
            pos = torch.searchsorted(train, d.node_index[: d.n_seed]).numpy()
            assert int(np.count_nonzero(np.diff(pos) != 1)) + 1 <= 5
    assert not torch.equal(epochs[0], epochs[1])
    # the sequence is a function of the seed
    again = NeighborSampler(edges, n, num_neighbors=(4,), batch_size=64, seed=0,
                            input_nodes=train, seed_block_size=16)
    assert torch.equal(torch.cat([d.node_index[: d.n_seed] for d in again]), epochs[0])


def test_curve_order_and_block_seeds_read_few_ranges(ordered_graph):
    random_edges, curve_edges, n = ordered_graph
    options = {"num_neighbors": (6, 4), "batch_size": 64, "seed": 0}
    random_order = np.median(_ranges(NeighborSampler(random_edges, n, **options)))
    curve = np.median(_ranges(NeighborSampler(curve_edges, n, **options)))
    blocks = np.median(_ranges(NeighborSampler(curve_edges, n, seed_block_size=16, **options)))
    print(f"ranges per sub-graph: random order {random_order}, curve {curve}, curve + blocks {blocks}")
    assert blocks * 1.5 < curve and curve * 1.5 < random_order
    # induced sub-graphs of block seeds keep most of their edges; random node sets do not
    def kept(sampler):
        return np.mean([(d.edge_index[0] != d.edge_index[1]).sum().item() / d.num_nodes for d in sampler])
    plain = kept(RandomNodeSampler(curve_edges, n, num_nodes_per_step=64, seed=0))
    patches = kept(RandomNodeSampler(curve_edges, n, num_nodes_per_step=64, seed=0, seed_block_size=32))
    assert patches > 5 * plain


def test_bad_seed_block_size(ordered_graph):
    _, edges, n = ordered_graph
    with pytest.raises(ValueError, match="seed_block_size"):
        NeighborSampler(edges, n, seed_block_size=0)
