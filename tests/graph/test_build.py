"""Spatial graph construction: invariants, exactness against brute force, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist

from step.graph import build_spatial_graph, graph_from_adata, lattice_spacing, section_graphs

from ._helpers import check_graph, edge_keys, grid_sections, hex_lattice


def _codes(labels: np.ndarray) -> np.ndarray:
    return pd.factorize(labels, sort=True)[0]


def _brute_force_keys(coords: np.ndarray, codes: np.ndarray, rule) -> np.ndarray:
    """Edge keys of the symmetric graph (self-loops included) by full distance matrices."""
    n = coords.shape[0]
    keys = []
    for code in np.unique(codes):
        idx = np.flatnonzero(codes == code)
        dist = cdist(coords[idx], coords[idx])
        adj = rule(dist)
        adj = adj | adj.T | np.eye(len(idx), dtype=bool)
        i, j = np.nonzero(adj)
        keys.append(idx[i] * n + idx[j])
    return np.sort(np.concatenate(keys))


@pytest.mark.parametrize("k", [1, 4, 6])
def test_knn_matches_brute_force(k: int) -> None:
    coords, labels = grid_sections(jitter=0.2, seed=1)
    codes = _codes(labels)
    ei = build_spatial_graph(coords, labels, method="knn", k=k, backend="scipy")
    n = coords.shape[0]
    check_graph(ei, n, codes)

    def nearest(dist: np.ndarray) -> np.ndarray:
        order = np.argsort(dist, axis=1)[:, 1 : k + 1]
        adj = np.zeros_like(dist, dtype=bool)
        np.put_along_axis(adj, order, True, axis=1)
        return adj

    np.testing.assert_array_equal(edge_keys(ei, n), _brute_force_keys(coords, codes, nearest))
    degree = np.bincount(ei[0].numpy(), minlength=n)
    assert degree.min() >= k + 1  # k neighbours plus the self-loop


def test_knn_sections_are_independent_of_node_order() -> None:
    coords, labels = grid_sections(n_sections=2, jitter=0.2, seed=2)
    n = coords.shape[0]
    perm = np.random.default_rng(0).permutation(n)
    ei = build_spatial_graph(coords[perm], labels[perm], k=5)
    check_graph(ei, n, _codes(labels[perm]))
    # map back to the unpermuted ids and compare with the graph built in order
    back = torch.from_numpy(perm)[ei]
    expected = build_spatial_graph(coords, labels, k=5)
    np.testing.assert_array_equal(np.sort(edge_keys(back, n)), edge_keys(expected, n))


def test_sections_never_linked_even_when_overlapping() -> None:
    coords, labels = grid_sections(n_sections=3, jitter=0.0)
    ei = build_spatial_graph(coords, labels, k=6)
    check_graph(ei, coords.shape[0], _codes(labels))
    # without sections the same (overlapping) coordinates do get linked across
    merged = build_spatial_graph(coords, None, k=6)
    codes = _codes(labels)
    assert np.any(codes[merged[0].numpy()] != codes[merged[1].numpy()])


def test_small_sections_and_single_nodes() -> None:
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = np.array(["a", "a", "a", "b"])
    ei = build_spatial_graph(coords, labels, k=6)
    check_graph(ei, 4, _codes(labels))
    # section "a" has fewer than k + 1 nodes: complete graph; "b" only its self-loop
    assert ei.shape[1] == 9 + 1
    single = build_spatial_graph(np.array([[1.0, 2.0]]), k=3)
    assert single.tolist() == [[0], [0]]


def test_duplicate_coordinates_keep_one_self_loop() -> None:
    coords = np.array([[0.0, 0.0]] * 3 + [[1.0, 0.0], [2.0, 0.0]])
    ei = build_spatial_graph(coords, k=2)
    check_graph(ei, 5)
    degree = np.bincount(ei[0].numpy(), minlength=5)
    assert degree.min() >= 3


def test_radius_matches_brute_force() -> None:
    coords, labels = grid_sections(jitter=0.3, seed=3)
    codes = _codes(labels)
    radius = 1.3
    ei = build_spatial_graph(coords, labels, method="radius", radius=radius)
    n = coords.shape[0]
    check_graph(ei, n, codes)
    expected = _brute_force_keys(coords, codes, lambda d: d <= radius)
    np.testing.assert_array_equal(edge_keys(ei, n), expected)


@pytest.mark.parametrize("spacing", [1.0, 137.5])
def test_hex_lattice_interior_has_six_neighbours(spacing: float) -> None:
    rows, cols = 12, 14
    lattice = hex_lattice(rows, cols, spacing=spacing)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    one = lattice @ rot.T + 1000.0
    coords = np.concatenate([one, one])  # two sections with identical positions
    labels = np.repeat([0, 1], one.shape[0])
    ei = build_spatial_graph(coords, labels, method="hex")
    n = coords.shape[0]
    check_graph(ei, n, labels)
    degree = np.bincount(ei[0].numpy(), minlength=n).reshape(2, rows, cols)
    assert np.all(degree[:, 1:-1, 1:-1] == 7)  # 6 neighbours + self-loop
    assert degree.max() == 7
    assert degree.min() >= 3  # corners
    np.testing.assert_allclose(lattice_spacing(one), spacing)


def test_hex_spacing_is_estimated_per_section() -> None:
    small = hex_lattice(8, 8, spacing=1.0)
    large = hex_lattice(8, 8, spacing=50.0)
    coords = np.concatenate([small, large])
    labels = np.repeat(["small", "large"], 64)
    ei = build_spatial_graph(coords, labels, method="hex")
    degree = np.bincount(ei[0].numpy(), minlength=128).reshape(2, 8, 8)
    assert np.all(degree[:, 1:-1, 1:-1] == 7)


def test_accepts_tensors_and_categoricals() -> None:
    coords, labels = grid_sections(n_sections=2)
    from_numpy = build_spatial_graph(coords, labels, k=4)
    from_torch = build_spatial_graph(torch.from_numpy(coords).float(), pd.Categorical(labels), k=4)
    assert torch.equal(from_numpy, from_torch)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k"),
        ({"k": 2.5}, TypeError, "k"),
        ({"method": "delaunay"}, ValueError, "method"),
        ({"method": "radius"}, ValueError, "radius"),
        ({"method": "radius", "radius": 0.0}, ValueError, "radius"),
        ({"method": "radius", "radius": -1.0}, ValueError, "radius"),
        ({"method": "knn", "radius": 1.0}, ValueError, "radius"),
        ({"backend": "faiss"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    coords, _ = grid_sections(n_sections=1)
    with pytest.raises(error, match=match):
        build_spatial_graph(coords, **kwargs)


def test_bad_coordinates_and_sections() -> None:
    coords, labels = grid_sections(n_sections=2)
    bad = coords.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_spatial_graph(bad)
    with pytest.raises(ValueError, match="shape"):
        build_spatial_graph(coords[:, 0])
    with pytest.raises(ValueError, match="empty"):
        build_spatial_graph(np.empty((0, 2)))
    with pytest.raises(ValueError, match="lengths must match"):
        build_spatial_graph(coords, labels[:-1])
    missing = labels.astype(object)
    missing[3] = None
    with pytest.raises(ValueError, match="missing"):
        build_spatial_graph(coords, missing)


def _spatial_adata() -> ad.AnnData:
    coords, labels = grid_sections(n_sections=2, jitter=0.2)
    obs = pd.DataFrame(
        {"x": coords[:, 0], "y": coords[:, 1], "slice": pd.Categorical(labels)},
        index=[f"spot{i}" for i in range(coords.shape[0])],
    )
    adata = ad.AnnData(X=np.ones((coords.shape[0], 3), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = coords
    return adata


def test_graph_from_adata_obsm_and_obs_columns() -> None:
    adata = _spatial_adata()
    from_obsm = graph_from_adata(adata, section_key="slice", k=4)
    from_obs = graph_from_adata(adata, coord_keys=["x", "y"], section_key="slice", k=4)
    assert torch.equal(from_obsm, from_obs)
    check_graph(from_obsm, adata.n_obs, adata.obs["slice"].cat.codes.to_numpy())
    hexed = graph_from_adata(adata, method="hex")
    check_graph(hexed, adata.n_obs)


def test_graph_from_adata_missing_keys() -> None:
    adata = _spatial_adata()
    with pytest.raises(KeyError, match="coords"):
        graph_from_adata(adata, spatial_key="coords")
    with pytest.raises(KeyError, match="'z'"):
        graph_from_adata(adata, coord_keys=["x", "z"])
    with pytest.raises(KeyError, match="sample"):
        graph_from_adata(adata, section_key="sample")


def test_section_graphs_partition_nodes_and_edges() -> None:
    coords, labels = grid_sections(n_sections=3)
    perm = np.random.default_rng(4).permutation(coords.shape[0])
    coords, labels = coords[perm], labels[perm]
    n = coords.shape[0]
    ei = build_spatial_graph(coords, labels, k=6)
    graphs = section_graphs(ei, labels)
    assert [g.section for g in graphs] == ["section_0", "section_1", "section_2"]
    all_nodes = torch.cat([g.node_index for g in graphs])
    assert torch.equal(torch.sort(all_nodes).values, torch.arange(n))
    assert sum(g.edge_index.shape[1] for g in graphs) == ei.shape[1]
    global_keys = []
    for g in graphs:
        assert g.node_index.dtype == torch.long
        assert g.num_nodes == g.node_index.numel()
        assert np.all(labels[g.node_index.numpy()] == g.section)
        assert g.edge_index.min() >= 0 and g.edge_index.max() < g.num_nodes
        check_graph(g.edge_index, g.num_nodes)
        global_keys.append(edge_keys(g.node_index[g.edge_index], n))
    np.testing.assert_array_equal(np.sort(np.concatenate(global_keys)), edge_keys(ei, n))


def test_section_graphs_rejects_crossing_edges() -> None:
    labels = np.array([0, 0, 1, 1])
    ei = torch.tensor([[0, 1, 1], [1, 0, 2]])
    with pytest.raises(ValueError, match="link two sections"):
        section_graphs(ei, labels)
    with pytest.raises(ValueError, match="num_nodes"):
        section_graphs(torch.tensor([[0], [7]]), labels)


def test_batched_section_graphs_keep_global_node_ids() -> None:
    from torch_geometric.loader import DataLoader

    coords, labels = grid_sections(n_sections=3, rows=4, cols=5)
    n = coords.shape[0]
    ei = build_spatial_graph(coords, labels, k=4)
    graphs = section_graphs(ei, labels)
    batch = next(iter(DataLoader(graphs, batch_size=3, shuffle=False)))
    assert torch.equal(batch.node_index, torch.arange(n))
    np.testing.assert_array_equal(
        np.sort(edge_keys(batch.node_index[batch.edge_index], n)), edge_keys(ei, n)
    )
