"""Coordinates and graph checks shared by the graph tests."""

from __future__ import annotations

import numpy as np
import torch


def grid_sections(
    n_sections: int = 3, rows: int = 12, cols: int = 10, *, jitter: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered square grids, one per section, all over the same coordinate range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel()], axis=1)
    coords = np.concatenate([grid + rng.normal(0.0, jitter, grid.shape) for _ in range(n_sections)])
    labels = np.repeat([f"section_{i}" for i in range(n_sections)], grid.shape[0])
    return coords, labels


def hex_lattice(rows: int, cols: int, *, spacing: float = 1.0) -> np.ndarray:
    """Points of a hexagonal lattice (odd rows shifted by half a spacing)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = (c + 0.5 * (r % 2)) * spacing
    y = r * spacing * np.sqrt(3.0) / 2.0
    return np.stack([x.ravel(), y.ravel()], axis=1)


def edge_keys(edge_index: torch.Tensor, n: int) -> np.ndarray:
    ei = edge_index.numpy()
    return ei[0] * n + ei[1]


def check_graph(edge_index: torch.Tensor, n: int, codes: np.ndarray | None = None) -> None:
    """The invariants every built graph must satisfy."""
    assert edge_index.dtype == torch.long
    assert edge_index.shape[0] == 2
    ei = edge_index.numpy()
    assert ei.min() >= 0 and ei.max() < n
    keys = edge_keys(edge_index, n)
    # sorted by (source, target) with no duplicates
    assert np.all(np.diff(keys) > 0)
    # symmetric
    reverse = np.sort(ei[1] * n + ei[0])
    np.testing.assert_array_equal(reverse, keys)
    # exactly one self-loop per node
    loops = ei[0][ei[0] == ei[1]]
    np.testing.assert_array_equal(np.bincount(loops, minlength=n), np.ones(n, dtype=int))
    if codes is not None:
        assert np.all(codes[ei[0]] == codes[ei[1]])
