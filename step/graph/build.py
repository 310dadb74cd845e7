"""Spatial neighbour graphs built per tissue section.

Every graph returned here is in global node ids, symmetric, holds exactly one
self-loop per node, has no duplicate edges, never links two sections, and is
sorted by (source, target). Neighbour search uses :class:`scipy.spatial.cKDTree`
(one tree per section, queries in parallel), or ``torch_cluster`` for k-nearest
neighbours when it is installed.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import torch
from scipy.spatial import cKDTree

from step.graph import _backends
from step.graph._data import GraphData
from step.graph._validate import as_edge_index, check_int, section_codes

Method = Literal["knn", "radius", "hex"]
Backend = Literal["auto", "scipy", "torch_cluster"]

_METHODS = ("knn", "radius", "hex")
_BACKENDS = ("auto", "scipy", "torch_cluster")
#: Neighbours of a hexagonal lattice lie within this multiple of the spacing.
HEX_TOLERANCE = 1.1


def _as_coords(coords: Any) -> np.ndarray:
    if isinstance(coords, torch.Tensor):
        coords = coords.detach().cpu().numpy()
    try:
        arr = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = f"`coords` must be a numeric array of shape (n, d), got {type(coords).__name__}."
        raise TypeError(msg) from err
    if arr.ndim != 2 or arr.shape[1] < 1:
        msg = f"`coords` must have shape (n, d) with d >= 1, got {arr.shape}."
        raise ValueError(msg)
    if arr.shape[0] == 0:
        msg = "`coords` is empty; at least one node is needed."
        raise ValueError(msg)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        msg = (
            f"`coords` has {int(bad.sum())} rows with NaN or infinite values "
            f"(first at row {int(np.flatnonzero(bad)[0])}); all coordinates must be finite."
        )
        raise ValueError(msg)
    return arr


def _knn_pairs(tree: cKDTree, pts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point paired with its ``k`` nearest others (self included in the query)."""
    kk = min(k + 1, pts.shape[0])
    _, nbr = tree.query(pts, k=kk, workers=-1)
    nbr = np.asarray(nbr, dtype=np.int64).reshape(pts.shape[0], kk)
    src = np.repeat(np.arange(pts.shape[0], dtype=np.int64), kk)
    return src, nbr.ravel()


def _radius_pairs(tree: cKDTree, radius: float) -> tuple[np.ndarray, np.ndarray]:
    pairs = tree.query_pairs(radius, output_type="ndarray").astype(np.int64, copy=False)
    return pairs[:, 0], pairs[:, 1]


def lattice_spacing(coords: Any) -> float:
    """Median distance from each point to its nearest distinct neighbour.

    Parameters
    ----------
    coords
        Coordinates of shape ``(n, d)`` with ``n >= 2``.

    Returns
    -------
    float
        The estimated spacing of a regular grid (``0.0`` when every point
        coincides with another).
    """
    pts = _as_coords(coords)
    if pts.shape[0] < 2:
        msg = f"a lattice spacing needs at least 2 points, got {pts.shape[0]}."
        raise ValueError(msg)
    return _spacing(cKDTree(pts), pts)


def _spacing(tree: cKDTree, pts: np.ndarray) -> float:
    dist, _ = tree.query(pts, k=2, workers=-1)
    nearest = dist[:, 1]
    nearest = nearest[nearest > 0]
    if nearest.size == 0:
        return 0.0
    return float(np.median(nearest))


def _section_pairs(
    pts: np.ndarray, method: str, k: int, radius: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs in local ids of one section (may hold self-loops or one direction)."""
    n = pts.shape[0]
    empty = np.empty(0, dtype=np.int64)
    if n == 1:
        return empty, empty
    tree = cKDTree(pts)
    if method == "knn":
        return _knn_pairs(tree, pts, k)
    if method == "radius":
        return _radius_pairs(tree, float(radius))  # type: ignore[arg-type]
    spacing = _spacing(tree, pts)
    if spacing == 0.0:
        return empty, empty
    return _radius_pairs(tree, HEX_TOLERANCE * spacing)


def _knn_torch_cluster(
    coords: np.ndarray, codes: np.ndarray, order: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - needs torch_cluster
    import torch_cluster

    x = torch.from_numpy(coords[order])
    batch = torch.from_numpy(codes[order])
    # Sections hold at least k + 1 nodes or the query returns all of them.
    pair = torch_cluster.knn(x, x, k + 1, batch, batch)
    order_t = torch.from_numpy(order)
    return order_t[pair[0]].numpy(), order_t[pair[1]].numpy()


def _pair_keys(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """``src * n + dst`` and ``dst * n + src`` of every pair: both directions as int64 keys."""
    n64 = np.int64(n)
    keys = np.empty(2 * src.size, dtype=np.int64)
    np.multiply(src, n64, out=keys[: src.size])
    keys[: src.size] += dst
    np.multiply(dst, n64, out=keys[src.size :])
    keys[src.size :] += src
    return keys


def _coalesced_from_keys(parts: list[np.ndarray], n: int) -> torch.Tensor:
    """Edge index from the pair keys of ``parts`` (emptied as they are used) plus one
    self-loop per node: sorted, no duplicates."""
    n64 = np.int64(n)
    parts.append(np.arange(n, dtype=np.int64) * (n64 + 1))
    keys = np.concatenate(parts)
    parts.clear()  # the pieces are copied: free them before sorting
    # A plain sort and a neighbour comparison: np.unique is far slower than
    # this on large int64 arrays with some NumPy releases.
    keys.sort()
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    keys = keys[first]
    del first
    out = np.empty((2, keys.size), dtype=np.int64)
    np.floor_divide(keys, n64, out=out[0])
    np.multiply(out[0], n64, out=out[1])
    np.subtract(keys, out[1], out=out[1])
    return torch.from_numpy(out)


def _symmetric_coalesced(src: np.ndarray, dst: np.ndarray, n: int) -> torch.Tensor:
    """Both directions of every pair, one self-loop per node, sorted, no duplicates."""
    return _coalesced_from_keys([_pair_keys(src, dst, n)], n)


def build_spatial_graph(
    coords: Any,
    sections: Any = None,
    *,
    method: Method = "knn",
    k: int = 6,
    radius: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Build a spatial neighbour graph, one independent graph per section.

    Parameters
    ----------
    coords
        Node coordinates, array-like or tensor of shape ``(n, d)``; finite.
    sections
        One section label per node (array-like of length ``n``), or ``None``
        when all nodes belong to one section. Nodes of different sections are
        never linked.
    method
        ``"knn"``: each node is linked to its ``k`` nearest nodes of the same
        section (then symmetrised, so degrees can exceed ``k``).
        ``"radius"``: all pairs closer than or at ``radius``.
        ``"hex"``: Visium-style hexagonal grids; pairs within
        ``1.1`` times the lattice spacing, estimated per section as the median
        nearest-neighbour distance, so interior spots get 6 neighbours.
    k
        Number of nearest neighbours for ``"knn"`` (``>= 1``). A section with
        ``k`` nodes or fewer becomes a complete graph.
    radius
        Distance cut-off for ``"radius"`` (``> 0``); only valid with that method.
    backend
        ``"scipy"`` (k-d trees), ``"torch_cluster"`` (k-nearest neighbours only,
        needs the package), or ``"auto"``: ``torch_cluster`` for ``"knn"`` when
        importable, scipy otherwise.

    Returns
    -------
    torch.Tensor
        ``int64`` edge index of shape ``(2, E)``: symmetric, one self-loop per
        node, no duplicates, sorted by source then target.

    Raises
    ------
    ValueError
        Bad coordinates (NaN, wrong shape), unknown ``method``, ``k < 1``,
        missing or non-positive ``radius``, or ``sections`` of the wrong length.
    """
    if method not in _METHODS:
        msg = f"`method` must be one of {_METHODS}, got {method!r}."
        raise ValueError(msg)
    if backend not in _BACKENDS:
        msg = f"`backend` must be one of {_BACKENDS}, got {backend!r}."
        raise ValueError(msg)
    k = check_int(k, "k", minimum=1)
    if method == "radius":
        if radius is None:
            msg = "`method='radius'` needs a `radius`; got None."
            raise ValueError(msg)
        if isinstance(radius, bool) or not isinstance(radius, (int, float, np.number)):
            msg = f"`radius` must be a positive number, got {radius!r}."
            raise TypeError(msg)
        if not np.isfinite(radius) or radius <= 0:
            msg = f"`radius` must be a finite number > 0, got {radius}."
            raise ValueError(msg)
    elif radius is not None:
        msg = (
            f"`radius` is only used with method='radius', got radius={radius} "
            f"with method={method!r}."
        )
        raise ValueError(msg)
    if backend == "torch_cluster" and (method != "knn" or not _backends.WITH_TORCH_CLUSTER):
        msg = (
            "`backend='torch_cluster'` needs the torch_cluster package and method='knn' "
            f"(installed: {_backends.WITH_TORCH_CLUSTER}, method: {method!r})."
        )
        raise ValueError(msg)

    pts = _as_coords(coords)
    n = pts.shape[0]
    codes, _ = section_codes(sections, n)
    order = np.argsort(codes, kind="stable")

    use_cluster = method == "knn" and (
        backend == "torch_cluster" or (backend == "auto" and _backends.WITH_TORCH_CLUSTER)
    )
    if use_cluster:  # pragma: no cover - needs torch_cluster
        src, dst = _knn_torch_cluster(pts, codes, order, k)
        return _symmetric_coalesced(src, dst, n)

    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes))])
    parts = []  # one section's pair keys at a time: its pairs are freed at once
    for start, stop in itertools.pairwise(bounds):
        idx = order[start:stop]
        s, d = _section_pairs(pts[idx], method, k, radius)
        parts.append(_pair_keys(idx[s], idx[d], n))
    return _coalesced_from_keys(parts, n)


def graph_from_adata(
    adata: Any,
    *,
    spatial_key: str = "spatial",
    coord_keys: Any = None,
    section_key: str | None = None,
    method: Method = "knn",
    k: int = 6,
    radius: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Build the spatial graph of an AnnData's observations.

    Parameters
    ----------
    adata
        AnnData whose observations are the graph's nodes (in ``obs`` order).
    spatial_key
        Key in ``adata.obsm`` holding coordinates ``(n_obs, d)``; used when
        ``coord_keys`` is ``None``.
    coord_keys
        Names of ``adata.obs`` columns holding the coordinates, e.g.
        ``("x", "y")``; an alternative to ``spatial_key``.
    section_key
        Column of ``adata.obs`` naming each observation's section; ``None``
        for a single section.
    method, k, radius, backend
        As in :func:`build_spatial_graph`.

    Returns
    -------
    torch.Tensor
        ``int64`` edge index ``(2, E)`` over the observations.

    Raises
    ------
    KeyError
        ``spatial_key``, a ``coord_keys`` column or ``section_key`` is missing.
    """
    obs = adata.obs
    if coord_keys is not None:
        keys = [coord_keys] if isinstance(coord_keys, str) else list(coord_keys)
        missing = [key for key in keys if key not in obs.columns]
        if missing:
            msg = f"coordinate columns {missing} not in adata.obs; available: {list(obs.columns)}."
            raise KeyError(msg)
        coords = obs[keys].to_numpy(dtype=np.float64)
    else:
        if spatial_key not in adata.obsm:
            available = list(adata.obsm.keys())
            msg = f"spatial_key {spatial_key!r} not in adata.obsm; available: {available}."
            raise KeyError(msg)
        coords = adata.obsm[spatial_key]
        if hasattr(coords, "to_numpy"):
            coords = coords.to_numpy()
    sections = None
    if section_key is not None:
        if section_key not in obs.columns:
            msg = f"section_key {section_key!r} not in adata.obs; available: {list(obs.columns)}."
            raise KeyError(msg)
        sections = obs[section_key]
    return build_spatial_graph(coords, sections, method=method, k=k, radius=radius, backend=backend)


def section_graphs(edge_index: Any, sections: Any) -> list[GraphData]:
    """Split a global graph into one graph per section.

    Parameters
    ----------
    edge_index
        ``(2, E)`` integer edges in global node ids, none linking two sections.
    sections
        One section label per node (array-like of length ``num_nodes``); the
        number of labels sets ``num_nodes``.

    Returns
    -------
    list of GraphData
        One graph per section (a :class:`torch_geometric.data.Data`), in
        sorted label order, each holding ``edge_index`` (local ids),
        ``num_nodes``, ``node_index`` (global ids, ``int64``, ascending) and
        ``section`` (its label). Edge order within a section is kept.
        Batching them with :class:`torch_geometric.loader.DataLoader` offsets
        ``edge_index`` but keeps ``node_index`` global.

    Raises
    ------
    ValueError
        An edge links two sections, or an id is out of range.
    """
    if isinstance(sections, torch.Tensor):
        sections = sections.detach().cpu().numpy()
    n = len(sections)
    codes, labels = section_codes(sections, n)
    ei = as_edge_index(edge_index, n).numpy()
    edge_codes = codes[ei[0]]
    crossing = edge_codes != codes[ei[1]]
    if crossing.any():
        first = int(np.flatnonzero(crossing)[0])
        msg = (
            f"{int(crossing.sum())} edges link two sections (first: {ei[0, first]} -> "
            f"{ei[1, first]}); section graphs need edges within sections only."
        )
        raise ValueError(msg)
    n_sec = len(labels)
    node_order = np.argsort(codes, kind="stable")
    node_counts = np.bincount(codes, minlength=n_sec)
    node_start = np.concatenate([[0], np.cumsum(node_counts)])
    local = np.empty(n, dtype=np.int64)
    local[node_order] = np.arange(n, dtype=np.int64) - np.repeat(node_start[:-1], node_counts)

    edge_order = np.argsort(edge_codes, kind="stable")
    edge_counts = np.bincount(edge_codes, minlength=n_sec)
    local_edges = torch.from_numpy(local[ei[:, edge_order]])
    node_index = torch.from_numpy(node_order)
    edge_parts = torch.split(local_edges, edge_counts.tolist(), dim=1)
    node_parts = torch.split(node_index, node_counts.tolist())
    return [
        GraphData(
            edge_index=e.contiguous(), node_index=v.clone(), num_nodes=int(v.numel()), section=lab
        )
        for e, v, lab in zip(edge_parts, node_parts, labels, strict=True)
    ]
