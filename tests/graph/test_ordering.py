"""Curve row orders: valid permutations, contiguous sections, neighbours close in the order."""

from __future__ import annotations

import numpy as np
import pytest

from step.datasets import spatial_benchmark_case
from step.graph import build_spatial_graph, spatial_order
from step.utils import contiguous_runs

from ._helpers import grid_sections


@pytest.fixture(scope="module")
def shuffled_case():
    """Three hexagonal sections of real cells, rows shuffled so the input order is random."""
    adata = spatial_benchmark_case("patches_hex_sections", seed=0)
    rows = np.random.default_rng(0).permutation(adata.n_obs)
    return adata[rows].copy()


def _edge_gaps(edge_index: np.ndarray, order: np.ndarray) -> np.ndarray:
    """|i - j| in the new order over the (non-loop) edges."""
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    src, dst = edge_index
    keep = src != dst
    return np.abs(position[src[keep]] - position[dst[keep]])


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
def test_order_is_a_permutation_with_contiguous_sections(shuffled_case, curve):
    sections = shuffled_case.obs["section"]
    order = spatial_order(shuffled_case.obsm["spatial"], sections, curve=curve)
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(shuffled_case.n_obs))
    ordered = sections.to_numpy()[order]
    # each section is one run, in category order
    changes = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    assert [ordered[i] for i in np.r_[0, changes]] == list(sections.cat.categories)


def test_graph_neighbours_are_close_in_curve_order(shuffled_case):
    coords, sections = shuffled_case.obsm["spatial"], shuffled_case.obs["section"].to_numpy()
    edges = build_spatial_graph(coords, sections, method="hex").numpy()
    n = shuffled_case.n_obs
    hilbert = np.median(_edge_gaps(edges, spatial_order(coords, sections)))
    morton = np.median(_edge_gaps(edges, spatial_order(coords, sections, curve="morton")))
    random = np.median(_edge_gaps(edges, np.random.default_rng(1).permutation(n)))
    print(f"median |i-j| over edges: hilbert {hilbert}, morton {morton}, random {random}")
    assert hilbert * 20 < random
    assert hilbert <= morton
    # the 1-hop neighbourhood of a spot lies in a few row ranges
    position = np.empty(n, dtype=np.int64)
    position[spatial_order(coords, sections)] = np.arange(n)
    runs = []
    for node in range(0, n, 7):
        hood = np.unique(position[edges[0][edges[1] == node]])
        runs.append(len(contiguous_runs(hood)))
    assert np.median(runs) <= 3, np.median(runs)


def test_hilbert_steps_are_adjacent_cells():
    # on a full 2^k grid, consecutive spots along the Hilbert curve are grid neighbours
    side = 16
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float)
    order = spatial_order(coords, bits=4)
    steps = np.abs(np.diff(coords[order], axis=0)).sum(axis=1)
    assert np.all(steps == 1)
    morton = spatial_order(coords, bits=4, curve="morton")
    assert np.abs(np.diff(coords[morton], axis=0)).sum(axis=1).max() > 1


def test_ties_keep_input_order_and_bad_input_is_refused():
    coords, labels = grid_sections(2, 4, 4)
    coords[:] = 0.0  # every spot in one cell
    assert np.array_equal(spatial_order(coords, labels), np.arange(len(labels)))
    with pytest.raises(ValueError, match="curve"):
        spatial_order(coords, labels, curve="peano")
    with pytest.raises(ValueError, match="bits"):
        spatial_order(coords, labels, bits=40)
    coords[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        spatial_order(coords, labels)
    with pytest.raises(ValueError, match="shape"):
        spatial_order(np.zeros(5), None)
