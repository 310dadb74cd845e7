"""Named spatial benchmark cases built from real cells: domains that share cell types.

Every case places real PBMC cells (:func:`step.datasets.pbmc68k_counts`) on a spot grid.
All domains of a case contain the same cell types and differ only in their proportions;
the proportions change smoothly across domain borders and along a gradient inside the
section, so a single spot identifies its domain only weakly and neighbouring domains
blend into each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from step.datasets._pbmc import pbmc68k_counts

__all__ = ["SPATIAL_BENCHMARK_CASES", "spatial_benchmark_case"]

#: PBMC cell types mixed in every domain (all domains share them).
BENCHMARK_TYPES = (
    "CD14+ Monocyte",
    "CD19+ B",
    "CD4+/CD25 T Reg",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
    "CD56+ NK",
    "Dendritic",
)


@dataclass(frozen=True)
class _Case:
    description: str
    grid: str  # "hex" (Visium-like) or "square" (ST)
    shape: tuple[int, int]  # rows, columns of each section
    n_sections: int
    n_domains: int
    layout: str  # "layers", "layers+patches" or "patches"
    values: str  # "counts" or "rounded_normalized"
    section_effect: float  # sd of the per-section log gene factors (0: none)
    cells_per_spot: float  # mean number of cells summed into one spot
    separation: float  # spread of the domains' log proportions


#: The named cases of :func:`spatial_benchmark_case`.
SPATIAL_BENCHMARK_CASES: dict[str, _Case] = {
    "cortex_hex": _Case(
        "One Visium-like hexagonal section (26 x 26 spots) with 8 cortex-like layers of "
        "uneven thickness (two of them thin) behind curved borders; raw counts.",
        "hex", (26, 26), 1, 8, "layers", "counts", 0.0, 6.0, 2.5),
    "st_rounded": _Case(
        "One ST square-grid section (22 x 24 spots) with 10 domains of uneven size: 7 "
        "layers and 3 round patches across them; normalised values rounded to integers.",
        "square", (22, 24), 1, 10, "layers+patches", "rounded_normalized", 0.0, 6.0, 2.5),
    "patches_hex_sections": _Case(
        "Three Visium-like hexagonal sections (15 x 20 spots each) with 7 patch-shaped "
        "domains of uneven size (a different layout in every section) and a section effect "
        "(per-section gene factors and sequencing depth); raw counts.",
        "hex", (15, 20), 3, 7, "patches", "counts", 0.25, 6.0, 2.5),
    "layers_st_sections": _Case(
        "Two ST square-grid sections (18 x 20 spots each) with 9 layers of uneven "
        "thickness and a section effect; normalised values rounded to integers.",
        "square", (18, 20), 2, 9, "layers", "rounded_normalized", 0.25, 6.0, 2.5),
}

#: Relative sequencing depth of successive sections (cycled).
_SECTION_DEPTH = (1.0, 0.6, 1.5)
#: Fraction of molecules of the summed cells kept in a spot (before section effects).
_CAPTURE = 0.5


def _grid_coords(kind: str, n_rows: int, n_cols: int) -> np.ndarray:
    """(x, y) of the spots; neighbouring spots are one unit apart on both grids."""
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rr, cc = rr.ravel().astype(np.float64), cc.ravel().astype(np.float64)
    if kind == "hex":
        return np.column_stack([cc + 0.5 * (rr % 2), rr * np.sqrt(3.0) / 2.0])
    return np.column_stack([cc, rr])


def _uneven_widths(rng: np.random.Generator, n: int, n_thin: int) -> np.ndarray:
    """Layer widths summing to 1: ``n_thin`` thin layers, the others of random width."""
    widths = rng.uniform(0.6, 2.2, size=n)
    thin = rng.choice(n, size=min(n_thin, n), replace=False)
    widths[thin] = 0.35
    return widths / widths.sum()


def _layers(rng: np.random.Generator, xy: np.ndarray, n_layers: int, n_thin: int) -> np.ndarray:
    """Layer index of each spot: bands across a depth axis with wavy borders."""
    x = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])
    y = (xy[:, 1] - xy[:, 1].min()) / np.ptp(xy[:, 1])
    depth = y + 0.08 * np.sin(2 * np.pi * (rng.uniform(0.6, 1.2) * x + rng.random()))
    depth = (depth - depth.min()) / np.ptp(depth)
    edges = np.cumsum(_uneven_widths(rng, n_layers, n_thin))[:-1]
    return np.searchsorted(edges, depth, side="right")


def _patches(rng: np.random.Generator, xy: np.ndarray, n_domains: int) -> np.ndarray:
    """Domain of each spot: a weighted Voronoi partition whose weights make sizes uneven."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float(np.max(hi - lo))
    for _ in range(200):
        centres = lo + rng.random((n_domains, 2)) * (hi - lo)
        weights = rng.uniform(0.0, 0.12, size=n_domains) * span**2
        dist = ((xy[:, None, :] - centres[None]) ** 2).sum(axis=2) - weights[None]
        labels = np.argmin(dist, axis=1)
        sizes = np.bincount(labels, minlength=n_domains)
        if sizes.min() >= 0.25 * xy.shape[0] / n_domains and sizes.max() >= 2.5 * sizes.min():
            return labels
    return labels


def _layout(rng: np.random.Generator, case: _Case, xy: np.ndarray) -> np.ndarray:
    if case.layout == "layers":
        return _layers(rng, xy, case.n_domains, n_thin=2)
    if case.layout == "patches":
        return _patches(rng, xy, case.n_domains)
    # layers with round patches laid over them
    n_patches = 3
    labels = _layers(rng, xy, case.n_domains - n_patches, n_thin=2)
    span = float(np.ptp(xy[:, 0]))
    for p, radius in enumerate(rng.uniform(0.09, 0.16, size=n_patches) * span):
        for _ in range(100):
            centre = xy.min(axis=0) + (0.15 + 0.7 * rng.random(2)) * np.ptp(xy, axis=0)
            inside = ((xy - centre) ** 2).sum(axis=1) <= radius**2
            if (labels[inside] < case.n_domains - n_patches).all():
                break
        labels[inside] = case.n_domains - n_patches + p
    return labels


def _smooth_proportions(xy: np.ndarray, anchors: np.ndarray, labels: np.ndarray,
                        gradient: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    """Cell-type proportions of each spot: the domain proportions averaged with a Gaussian
    kernel over nearby spots (smooth borders), tilted along a section-wide gradient."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    pairs = tree.query_pairs(3 * bandwidth, output_type="ndarray")
    i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(len(xy))])
    j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(len(xy))])
    w = np.exp(-((xy[i] - xy[j]) ** 2).sum(axis=1) / (2 * bandwidth**2))
    kernel = sp.csr_matrix((w, (i, j)), shape=(len(xy), len(xy)))
    kernel = sp.diags(1.0 / np.asarray(kernel.sum(axis=1)).ravel()) @ kernel
    props = kernel @ anchors[labels]
    x = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])
    props = props * np.exp(np.outer(x - 0.5, gradient))
    return props / props.sum(axis=1, keepdims=True)


def spatial_benchmark_case(name: str, seed: int = 0) -> ad.AnnData:
    """One named spatial benchmark case, generated offline from real cells.

    All domains of a case mix the same seven PBMC cell types (``BENCHMARK_TYPES``) and
    differ only in their proportions: each domain has log proportions drawn around a
    common mean, each spot's proportions are the domain proportions of its
    neighbourhood averaged with a Gaussian kernel (one spot spacing wide, so borders
    blend) and tilted along a gradient across the section. A spot sums ``1 + Poisson(5)``
    cells drawn from those proportions and keeps each molecule with probability 0.5
    (Poisson resampled). With a section effect every section multiplies each gene by
    ``exp(N(0, 0.25))`` and its depth by 1, 0.6 or 1.5 (first, second, third section). Rounded normalised values scale each spot to the median total and round.

    Cases (``SPATIAL_BENCHMARK_CASES``):

    ``"cortex_hex"``
        one hexagonal (Visium-like) section of 676 spots, 8 layers (two thin), counts;
    ``"st_rounded"``
        one square-grid (ST) section of 528 spots, 10 domains (7 layers, 3 patches),
        normalised values rounded to integers;
    ``"patches_hex_sections"``
        three hexagonal sections of 300 spots, 7 patch domains, section effect, counts;
    ``"layers_st_sections"``
        two square-grid sections of 360 spots, 9 layers, section effect, rounded
        normalised values.

    Parameters
    ----------
    name
        Case name (a key of ``SPATIAL_BENCHMARK_CASES``).
    seed
        Seed of the random generator; the result is a function of ``name`` and ``seed``.

    Returns
    -------
    AnnData of spots x 765 genes with

    - ``X``: ``scipy.sparse.csr_matrix`` of float32 integer values (counts, or rounded
      normalised values);
    - ``obsm["spatial"]``: (x, y) coordinates, neighbouring spots one unit apart;
    - ``obs["section"]``, ``obs["domain_true"]``: categorical section and domain;
    - ``obs["n_cells"]``: cells summed into the spot;
    - ``uns["case"]``: case name, description, grid, values, section effect and seed;
    - ``uns["domain_proportions"]``: DataFrame of each domain's cell-type proportions
      (one row per cell type, one column per domain).

    Raises
    ------
    KeyError
        If ``name`` is not a case.
    """
    if name not in SPATIAL_BENCHMARK_CASES:
        msg = f"unknown case {name!r}; choose one of {sorted(SPATIAL_BENCHMARK_CASES)}"
        raise KeyError(msg)
    case = SPATIAL_BENCHMARK_CASES[name]
    source = pbmc68k_counts()
    counts = sp.csr_matrix(source.X, dtype=np.float64)
    labels_all = source.obs["bulk_labels"].astype(str).to_numpy()
    cells_of_type = [np.flatnonzero(labels_all == t) for t in BENCHMARK_TYPES]
    n_types = len(BENCHMARK_TYPES)

    rng = np.random.default_rng([int(seed), sorted(SPATIAL_BENCHMARK_CASES).index(name)])
    log_anchor = rng.normal(0.0, case.separation, size=(case.n_domains, n_types))
    anchors = np.exp(log_anchor)
    anchors /= anchors.sum(axis=1, keepdims=True)
    gradient = rng.normal(0.0, 0.8, size=n_types)

    xy = _grid_coords(case.grid, *case.shape)
    n_spots = xy.shape[0]
    n_genes = counts.shape[1]
    blocks, domains, n_cells_all = [], [], []
    for s in range(case.n_sections):
        labels = _layout(rng, case, xy)
        props = _smooth_proportions(xy, anchors, labels, gradient)
        n_cells = 1 + rng.poisson(case.cells_per_spot - 1.0, size=n_spots)
        cum = np.cumsum(props, axis=1)
        cum[:, -1] = 1.0
        owner = np.repeat(np.arange(n_spots), n_cells)
        types = (rng.random(owner.size)[:, None] > cum[owner]).sum(axis=1)
        cells = np.empty(owner.size, dtype=np.int64)
        for t in range(n_types):
            where = np.flatnonzero(types == t)
            cells[where] = cells_of_type[t][rng.integers(0, cells_of_type[t].size, where.size)]
        pick = sp.csr_matrix((np.ones(owner.size), (owner, cells)), shape=(n_spots, counts.shape[0]))
        mean = (pick @ counts).tocsr() * _CAPTURE
        if case.section_effect > 0:
            factor = np.exp(rng.normal(0.0, case.section_effect, size=n_genes))
            factor *= _SECTION_DEPTH[s % len(_SECTION_DEPTH)]
            mean = (mean @ sp.diags(factor)).tocsr()
        mean.data = rng.poisson(mean.data).astype(np.float64)
        mean.eliminate_zeros()
        blocks.append(mean)
        domains.append(labels)
        n_cells_all.append(n_cells)
    x = sp.vstack(blocks).tocsr()
    if case.values == "rounded_normalized":
        totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.median(totals) / np.maximum(totals, 1.0)
        x = (sp.diags(scale) @ x).tocsr()
        x.data = np.rint(x.data)
        x.eliminate_zeros()
    x = x.astype(np.float32)
    x.sort_indices()

    section = np.repeat(np.arange(case.n_sections), n_spots)
    domain_names = [f"domain_{d}" for d in range(case.n_domains)]
    section_names = [f"section_{s}" for s in range(case.n_sections)]
    obs = pd.DataFrame(
        {
            "section": pd.Categorical.from_codes(section, categories=section_names),
            "domain_true": pd.Categorical.from_codes(np.concatenate(domains),
                                                     categories=domain_names),
            "n_cells": np.concatenate(n_cells_all).astype(np.int64),
        },
        index=pd.Index([f"s{s}_spot{i}" for s in range(case.n_sections) for i in range(n_spots)]),
    )
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=source.var_names.astype(str).copy()))
    out.obsm["spatial"] = np.tile(xy, (case.n_sections, 1))
    out.uns["case"] = {"name": name, "description": case.description, "grid": case.grid,
                       "values": case.values, "section_effect": case.section_effect,
                       "seed": int(seed)}
    out.uns["domain_proportions"] = pd.DataFrame(anchors.T, index=list(BENCHMARK_TYPES),
                                                 columns=domain_names)
    return out
