"""Sub-graph samplers: item contract, fan-out, coverage, determinism, sections."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch_geometric.utils import subgraph

from step.graph import WITH_PYG_LIB, NeighborSampler, RandomNodeSampler, build_spatial_graph

from ._helpers import edge_keys, grid_sections

FAN_OUT = (4, 3)


@pytest.fixture(scope="module")
def spatial_graph() -> tuple[torch.Tensor, np.ndarray]:
    coords, labels = grid_sections(n_sections=4, rows=15, cols=12, jitter=0.2, seed=5)
    return build_spatial_graph(coords, labels, k=8), labels


def _in_degree_without_loops(edge_index: torch.Tensor, n: int) -> np.ndarray:
    ei = edge_index.numpy()
    real = ei[0] != ei[1]
    return np.bincount(ei[1][real], minlength=n)


def _check_item(data, edge_index: torch.Tensor, n: int, fan_out: tuple[int, ...]) -> None:
    node_index, local = data.node_index, data.edge_index
    assert node_index.dtype == torch.long and local.dtype == torch.long
    assert data.num_nodes == node_index.numel()
    assert torch.unique(node_index).numel() == node_index.numel()
    assert data.seed_mask.dtype == torch.bool
    assert data.seed_mask.sum().item() == data.n_seed
    assert data.seed_mask[: data.n_seed].all()
    assert sum(data.num_sampled_nodes) == data.num_nodes
    assert data.num_sampled_nodes[0] == data.n_seed
    assert local.min() >= 0 and local.max() < data.num_nodes
    # every sampled edge is an edge of the full graph, none repeated
    sampled = edge_keys(node_index[local], n)
    assert np.unique(sampled).size == sampled.size
    assert np.isin(sampled, edge_keys(edge_index, n)).all()
    # one self-loop per node, as in the full graph
    loops = local[0][local[0] == local[1]].numpy()
    np.testing.assert_array_equal(np.bincount(loops, minlength=data.num_nodes), 1)
    # fan-out per hop: a node first reached at hop h has min(degree, fan_out[h])
    # sampled in-neighbours; nodes of the last hop have none
    full_degree = _in_degree_without_loops(edge_index, n)[node_index.numpy()]
    got = _in_degree_without_loops(local, data.num_nodes)
    bounds = np.cumsum([0, *data.num_sampled_nodes])
    for hop, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hop < len(fan_out):
            cap = (
                full_degree[lo:hi]
                if fan_out[hop] < 0
                else np.minimum(full_degree[lo:hi], fan_out[hop])
            )
            np.testing.assert_array_equal(got[lo:hi], cap)
        else:
            assert np.all(got[lo:hi] == 0)


def test_items_follow_the_contract(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    sampler = NeighborSampler(edge_index, n, num_neighbors=FAN_OUT, batch_size=64, seed=0)
    items = list(sampler)
    assert len(items) == len(sampler) == int(np.ceil(n / 64))
    for data in items:
        _check_item(data, edge_index, n, FAN_OUT)
    assert sum(d.n_seed for d in items) == n


@pytest.mark.parametrize("fan_out", [(1,), (2, 2, 2), (-1, 2)])
def test_fan_out_variants(spatial_graph, fan_out: tuple[int, ...]) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    sampler = NeighborSampler(edge_index, n, num_neighbors=fan_out, batch_size=50, seed=1)
    for step, data in enumerate(sampler):
        _check_item(data, edge_index, n, fan_out)
        if step == 3:
            break


def test_epoch_covers_every_node_once(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    sampler = NeighborSampler(edge_index, n, num_neighbors=FAN_OUT, batch_size=100, seed=2)
    for _ in range(2):
        seeds = torch.cat([d.node_index[: d.n_seed] for d in sampler])
        assert torch.equal(torch.sort(seeds).values, torch.arange(n))
    ordered = NeighborSampler(edge_index, n, batch_size=100, shuffle=False, seed=2)
    seeds = torch.cat([d.node_index[: d.n_seed] for d in ordered])
    assert torch.equal(seeds, torch.arange(n))


def test_drop_last(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size  # 720
    sampler = NeighborSampler(edge_index, n, batch_size=100, drop_last=True, seed=0)
    items = list(sampler)
    assert len(items) == len(sampler) == 7
    assert all(d.n_seed == 100 for d in items)


def test_same_seed_same_sequence(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size

    def run(seed: int) -> list:
        sampler = NeighborSampler(edge_index, n, num_neighbors=FAN_OUT, batch_size=128, seed=seed)
        return [list(sampler) for _ in range(2)]

    first, again, other = run(7), run(7), run(8)
    for epoch_a, epoch_b in zip(first, again, strict=True):
        for a, b in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(a.node_index, b.node_index)
            assert torch.equal(a.edge_index, b.edge_index)
    assert not torch.equal(first[0][0].node_index, other[0][0].node_index)
    assert not torch.equal(first[0][0].node_index, first[1][0].node_index)


def test_set_epoch_and_state_dict_resume(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    sampler = NeighborSampler(edge_index, n, num_neighbors=FAN_OUT, batch_size=128, seed=3)
    epochs = [list(sampler) for _ in range(3)]
    state = {"seed": 3, "epoch": 2}
    resumed = NeighborSampler(edge_index, n, num_neighbors=FAN_OUT, batch_size=128, seed=99)
    resumed.load_state_dict(state)
    for a, b in zip(epochs[2], resumed, strict=True):
        assert torch.equal(a.edge_index, b.edge_index)
    sampler.set_epoch(0)
    assert torch.equal(next(iter(sampler)).node_index, epochs[0][0].node_index)
    assert sampler.state_dict() == {"seed": 3, "epoch": 1}


def test_global_torch_seed_governs_default_seed(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    torch.manual_seed(11)
    a = next(iter(NeighborSampler(edge_index, labels.size, batch_size=32)))
    torch.manual_seed(11)
    b = next(iter(NeighborSampler(edge_index, labels.size, batch_size=32)))
    assert torch.equal(a.edge_index, b.edge_index)


def test_sampling_is_uniform_without_replacement() -> None:
    n_leaves, fan_out, draws = 20, 5, 2000
    hub = torch.zeros(n_leaves, dtype=torch.long)
    leaves = torch.arange(1, n_leaves + 1)
    edge_index = torch.cat(
        [
            torch.stack([leaves, hub]),
            torch.stack([hub, leaves]),
            torch.arange(n_leaves + 1).repeat(2, 1),
        ],
        dim=1,
    )
    sampler = NeighborSampler(edge_index, n_leaves + 1, num_neighbors=(fan_out,), seed=0)
    counts = torch.zeros(n_leaves + 1)
    for _ in range(draws):
        data = sampler.sample([0])
        assert data.num_nodes == fan_out + 1
        counts[data.node_index[1:]] += 1
    expected = draws * fan_out / n_leaves
    assert counts[0] == 0
    assert torch.all((counts[1:] - expected).abs() < 0.2 * expected)


def test_sample_checks_seeds(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    sampler = NeighborSampler(edge_index, labels.size, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        sampler.sample([1, 1])
    with pytest.raises(ValueError, match="lie in"):
        sampler.sample([labels.size])
    with pytest.raises(ValueError, match="empty"):
        sampler.sample([])


def test_input_nodes_restrict_seeds_not_neighbours(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    train = torch.arange(0, n, 3)
    for given in (train, torch.isin(torch.arange(n), train)):
        sampler = NeighborSampler(
            edge_index, n, num_neighbors=FAN_OUT, batch_size=50, input_nodes=given, seed=0
        )
        items = list(sampler)
        seeds = torch.cat([d.node_index[: d.n_seed] for d in items])
        assert torch.equal(torch.sort(seeds).values, train)
        assert len(items) == len(sampler) == int(np.ceil(train.numel() / 50))
        others = torch.cat([d.node_index[d.n_seed :] for d in items])
        assert not torch.isin(others, train).all()


@pytest.mark.parametrize("graph_batch_size", [None, 1, 2])
def test_sections_limit_each_step(spatial_graph, graph_batch_size) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    codes = np.unique(labels, return_inverse=True)[1]
    sampler = NeighborSampler(
        edge_index,
        n,
        num_neighbors=FAN_OUT,
        batch_size=70,
        sections=labels,
        graph_batch_size=graph_batch_size,
        seed=4,
    )
    allowed = graph_batch_size or 1
    for _ in range(3):
        expected_len = len(sampler)
        items = list(sampler)
        assert len(items) == expected_len
        seen = []
        for data in items:
            _check_item(data, edge_index, n, FAN_OUT)
            drawn = set(data.sections.tolist())
            assert len(drawn) <= allowed
            assert set(codes[data.node_index[: data.n_seed].numpy()]) <= drawn
            # the graph has no cross-section edges, so neither has the sub-graph
            assert set(codes[data.node_index.numpy()]) <= drawn
            seen.append(data.node_index[: data.n_seed])
        assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(n))


def test_len_is_stable_during_iteration(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    sizes = np.repeat([0, 1, 2, 3], [100, 250, 30, 340])
    sampler = NeighborSampler(
        edge_index, labels.size, batch_size=64, sections=sizes, graph_batch_size=2, seed=0
    )
    for _ in range(4):
        lengths = [len(sampler) for _ in sampler]
        assert len(set(lengths)) == 1 and lengths[0] == len(lengths)


def test_scratch_buffer_is_reset_between_steps(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    sampler = NeighborSampler(edge_index, labels.size, batch_size=64, seed=0)
    assert sum(data.num_nodes for data in sampler) > 0
    assert torch.all(sampler._local.lookup(torch.arange(labels.size)) == -1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"num_neighbors": (3, 0)}, ValueError, "num_neighbors"),
        ({"num_neighbors": ()}, ValueError, "num_neighbors"),
        ({"graph_batch_size": 2}, ValueError, "sections"),
        ({"backend": "dgl"}, ValueError, "backend"),
        ({"input_nodes": torch.tensor([-1, 2])}, ValueError, "input_nodes"),
    ],
)
def test_bad_sampler_arguments(spatial_graph, kwargs: dict, error: type, match: str) -> None:
    edge_index, labels = spatial_graph
    with pytest.raises(error, match=match):
        NeighborSampler(edge_index, labels.size, **kwargs)


def test_bad_graph_inputs(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    with pytest.raises(ValueError, match="num_nodes"):
        NeighborSampler(edge_index, labels.size - 1)
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        NeighborSampler(edge_index.t(), labels.size)
    with pytest.raises(TypeError, match="integer"):
        NeighborSampler(edge_index.float(), labels.size)


@pytest.mark.skipif(WITH_PYG_LIB, reason="pyg-lib is installed")
def test_pyg_lib_backend_needs_the_package(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    with pytest.raises(ValueError, match="pyg-lib"):
        NeighborSampler(edge_index, labels.size, backend="pyg_lib")
    assert NeighborSampler(edge_index, labels.size, backend="auto").backend == "torch"


def test_random_node_sampler_induced_subgraphs(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    n = labels.size
    sampler = RandomNodeSampler(edge_index, n, num_nodes_per_step=150, seed=0)
    items = list(sampler)
    assert len(items) == len(sampler) == 5
    for data in items:
        assert data.n_seed == data.num_nodes == data.node_index.numel()
        assert data.seed_mask.all()
        expected, _ = subgraph(data.node_index, edge_index, relabel_nodes=True, num_nodes=n)
        # both number the nodes by their position in node_index
        m = data.num_nodes
        np.testing.assert_array_equal(
            edge_keys(data.edge_index, m), np.sort(edge_keys(expected, m))
        )
    seeds = torch.cat([d.node_index for d in items])
    assert torch.equal(torch.sort(seeds).values, torch.arange(n))
    again = list(RandomNodeSampler(edge_index, n, num_nodes_per_step=150, seed=0))
    assert all(torch.equal(a.node_index, b.node_index) for a, b in zip(items, again, strict=True))


def test_random_node_sampler_checks_size(spatial_graph) -> None:
    edge_index, labels = spatial_graph
    with pytest.raises(ValueError, match="num_nodes_per_step"):
        RandomNodeSampler(edge_index, labels.size, num_nodes_per_step=0)


def test_batched_items_keep_global_node_ids(spatial_graph) -> None:
    from torch_geometric.data import Batch

    edge_index, labels = spatial_graph
    sampler = NeighborSampler(edge_index, labels.size, num_neighbors=FAN_OUT, batch_size=30, seed=0)
    stream = iter(sampler)
    items = [next(stream), next(stream)]
    batch = Batch.from_data_list(items)
    assert torch.equal(batch.node_index, torch.cat([d.node_index for d in items]))
    n = labels.size
    expected = np.concatenate([edge_keys(d.node_index[d.edge_index], n) for d in items])
    np.testing.assert_array_equal(edge_keys(batch.node_index[batch.edge_index], n), expected)
