"""Multi-section spatial data with known domains, assembled from real cells."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from step.datasets._pbmc import pbmc68k_counts
from step.utils.validation import check_adata, check_counts, check_not_empty, check_obs_key

__all__ = ["spatial_sections_from_cells"]

#: Dominant cell type of each domain for the PBMC source, most distinct lineages first.
PBMC_DOMINANT_TYPES = (
    "CD14+ Monocyte",
    "CD19+ B",
    "CD4+/CD25 T Reg",
    "CD56+ NK",
    "Dendritic",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
    "CD4+/CD45RO+ Memory",
    "CD34+",
    "CD4+/CD45RA+/CD25- Naive T",
)

_MAX_LAYOUT_TRIES = 200


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    try:
        n_rows, n_cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        msg = f"grid must be two positive integers (rows, columns), received {grid!r}"
        raise ValueError(msg) from None
    if n_rows < 1 or n_cols < 1:
        msg = f"grid must be two positive integers (rows, columns), received {grid!r}"
        raise ValueError(msg)
    return n_rows, n_cols


def _domain_layout(rng: np.random.Generator, coords: np.ndarray, n_domains: int) -> np.ndarray:
    """Voronoi partition of the grid around random centres, one region per domain.

    Centres are redrawn until every domain covers at least half of an equal share of
    the spots (the most balanced draw is kept if none does).
    """
    n_spots = coords.shape[0]
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    target = 0.5 * n_spots / n_domains
    best, best_min = None, -1
    for _ in range(_MAX_LAYOUT_TRIES):
        centres = lo + rng.random((n_domains, 2)) * (hi - lo)
        dist = ((coords[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        labels = np.argmin(dist, axis=1)
        smallest = int(np.bincount(labels, minlength=n_domains).min())
        if smallest > best_min:
            best, best_min = labels, smallest
        if smallest >= target:
            break
    return best


def _domain_proportions(
    rng: np.random.Generator, n_types: int, dominant: np.ndarray, dominant_fraction: float
) -> np.ndarray:
    """Cell-type mixture of each domain: its dominant type plus a random mix of the others."""
    props = np.zeros((dominant.size, n_types))
    for d, t in enumerate(dominant):
        others = np.setdiff1d(np.arange(n_types), [t])
        if others.size:
            props[d, others] = (1.0 - dominant_fraction) * rng.dirichlet(np.full(others.size, 2.0))
            props[d, t] = dominant_fraction
        else:
            props[d, t] = 1.0
    return props


def spatial_sections_from_cells(
    *,
    n_sections: int = 3,
    grid: Sequence[int] = (30, 30),
    n_domains: int = 4,
    seed: int = 0,
    dominant_fraction: float = 0.6,
    thinning: float = 0.8,
    dominant_types: Sequence[str] | None = None,
    source: ad.AnnData | None = None,
    cell_type_key: str = "bulk_labels",
) -> ad.AnnData:
    """Spatial sections with known domains, built by placing real cells on grids.

    Each section is a square grid of spots split into ``n_domains`` contiguous regions
    (a Voronoi partition around random centres, different in every section). A domain
    is a mixture of cell types: its dominant type makes up ``dominant_fraction`` of
    the spots and the rest is a domain-specific random mix of all other types. Every
    spot receives a cell drawn with replacement from the source cells of its sampled
    type, whose counts are binomially thinned (each molecule kept with probability
    ``thinning``) so repeated cells differ. One cell identifies its domain only
    weakly; averaging over spatial neighbours identifies it well.

    Parameters
    ----------
    n_sections
        Number of sections.
    grid
        Rows and columns of the spot grid of each section.
    n_domains
        Number of domains (at most the number of cell types).
    seed
        Seed of the random generator; the result is a function of the arguments.
    dominant_fraction
        Share of a domain's spots that carry its dominant type, in ``(0, 1]``.
    thinning
        Probability of keeping each molecule, in ``(0, 1]``.
    dominant_types
        Dominant cell type of each domain (``n_domains`` distinct types). By default
        distinct PBMC lineages for the PBMC source, else the most frequent types.
    source
        AnnData with integer counts in ``X`` and cell types in ``obs[cell_type_key]``;
        defaults to :func:`step.datasets.pbmc68k_counts`.
    cell_type_key
        obs column of ``source`` with the cell types.

    Returns
    -------
    AnnData of ``n_sections * rows * columns`` spots with

    - ``X``: ``scipy.sparse.csr_matrix`` of float32 integer counts;
    - ``obsm["spatial"]``: float coordinates (column, row) on the grid of each section;
    - ``obs["section"]``: categorical section name (``section_0``, ...);
    - ``obs["domain_true"]``: categorical domain (``domain_0``, ...; ``domain_i`` has
      ``dominant_types[i]`` as dominant type in every section);
    - ``obs["cell_type"]``: categorical type of the sampled cell;
    - ``obs["source_cell"]``: name of the sampled cell in ``source``;
    - ``uns["domain_proportions"]``: DataFrame of the cell-type mixture of each domain
      (one column per domain, one row per cell type; each column sums to 1). Cell types
      are rows because their names may contain ``/``, which h5ad column names may not.

    Raises
    ------
    ValueError
        If an argument is out of range or the source holds no counts.
    KeyError
        If ``cell_type_key`` or a dominant type does not exist.
    """
    n_rows, n_cols = _check_grid(grid)
    if int(n_sections) < 1:
        msg = f"n_sections must be >= 1, received {n_sections}"
        raise ValueError(msg)
    if not 0.0 < dominant_fraction <= 1.0:
        msg = f"dominant_fraction must be in (0, 1], received {dominant_fraction}"
        raise ValueError(msg)
    if not 0.0 < thinning <= 1.0:
        msg = f"thinning must be in (0, 1], received {thinning}"
        raise ValueError(msg)

    if source is None:
        source = pbmc68k_counts()
        default_dominants: Sequence[str] = PBMC_DOMINANT_TYPES
    else:
        check_adata(source)
        check_not_empty(source)
        default_dominants = ()
    check_obs_key(source, cell_type_key, role="cell_type_key")
    check_counts(source.X, name="source.X")
    counts = sp.csr_matrix(source.X, dtype=np.float32)

    cell_types = pd.Categorical(source.obs[cell_type_key].astype(str).to_numpy())
    sizes = np.bincount(cell_types.codes, minlength=len(cell_types.categories))
    type_names = [str(c) for c, n in zip(cell_types.categories, sizes) if n > 0]
    type_codes = pd.Categorical(cell_types, categories=type_names).codes
    n_types = len(type_names)
    if not 1 <= int(n_domains) <= n_types:
        msg = f"n_domains must be between 1 and the number of cell types ({n_types}), received {n_domains}"
        raise ValueError(msg)
    n_domains = int(n_domains)

    if dominant_types is None:
        by_size = [type_names[i] for i in np.argsort(-np.bincount(type_codes), kind="stable")]
        preferred = [t for t in default_dominants if t in type_names]
        dominant_types = (preferred + [t for t in by_size if t not in preferred])[:n_domains]
    dominant_types = [str(t) for t in dominant_types]
    missing = [t for t in dominant_types if t not in type_names]
    if missing:
        msg = f"dominant types {missing} not found in obs[{cell_type_key!r}]; available: {type_names}"
        raise KeyError(msg)
    if len(dominant_types) != n_domains or len(set(dominant_types)) != n_domains:
        msg = f"dominant_types must name {n_domains} distinct cell types, received {dominant_types}"
        raise ValueError(msg)
    dominant = np.array([type_names.index(t) for t in dominant_types])

    rng = np.random.default_rng(seed)
    props = _domain_proportions(rng, n_types, dominant, dominant_fraction)
    cum_props = np.cumsum(props, axis=1)
    cum_props[:, -1] = 1.0
    cells_of_type = [np.flatnonzero(type_codes == t) for t in range(n_types)]

    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    grid_coords = np.column_stack([cc.ravel(), rr.ravel()]).astype(np.float64)
    n_spots = grid_coords.shape[0]

    domains, spot_types, sampled = [], [], []
    for _ in range(int(n_sections)):
        domain = _domain_layout(rng, grid_coords, n_domains)
        u = rng.random(n_spots)
        spot_type = (u[:, None] > cum_props[domain]).sum(axis=1)
        cell = np.empty(n_spots, dtype=np.int64)
        for t in range(n_types):
            where = np.flatnonzero(spot_type == t)
            if where.size:
                cell[where] = cells_of_type[t][rng.integers(0, cells_of_type[t].size, size=where.size)]
        domains.append(domain)
        spot_types.append(spot_type)
        sampled.append(cell)
    domain = np.concatenate(domains)
    spot_type = np.concatenate(spot_types)
    cell = np.concatenate(sampled)

    x = counts[cell]
    x.data = rng.binomial(x.data.astype(np.int64), thinning).astype(np.float32)
    x.eliminate_zeros()
    x.sort_indices()

    section = np.repeat(np.arange(int(n_sections)), n_spots)
    section_names = [f"section_{s}" for s in range(int(n_sections))]
    domain_names = [f"domain_{d}" for d in range(n_domains)]
    obs_names = [f"s{s}_r{r}_c{c}" for s in range(int(n_sections)) for r, c in zip(rr.ravel(), cc.ravel())]
    obs = pd.DataFrame(
        {
            "section": pd.Categorical.from_codes(section, categories=section_names),
            "domain_true": pd.Categorical.from_codes(domain, categories=domain_names),
            "cell_type": pd.Categorical.from_codes(spot_type, categories=type_names),
            "source_cell": np.asarray(source.obs_names)[cell].astype(str),
        },
        index=pd.Index(obs_names),
    )
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=source.var_names.astype(str).copy()))
    out.obsm["spatial"] = np.tile(grid_coords, (int(n_sections), 1))
    out.uns["domain_proportions"] = pd.DataFrame(props.T, index=type_names, columns=domain_names)
    return out
