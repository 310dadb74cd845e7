"""Large sparse count matrices with cell-type structure, for benchmarks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["synthetic_counts"]

#: Matrix entries generated per chunk; bounds the temporary memory to a few hundred MB.
_CHUNK_VALUES = 1 << 25


def _type_profiles(
    rng: np.random.Generator, n_types: int, n_genes: int, density: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per type and gene: probability of a non-zero and mean of the non-zero count.

    Every type shares a log-normal gene background; each type raises both the
    detection probability and the level of its own block of marker genes.
    """
    base = rng.lognormal(0.0, 0.6, size=n_genes)
    weight = np.tile(base, (n_types, 1))
    level = np.tile(1.0 + rng.gamma(1.5, 1.0, size=n_genes), (n_types, 1))
    n_markers = max(1, n_genes // (2 * n_types))
    order = rng.permutation(n_genes)
    for t in range(n_types):
        markers = order[(t * n_markers) % n_genes : (t * n_markers) % n_genes + n_markers]
        weight[t, markers] *= 4.0
        level[t, markers] *= 3.0
    prob = density * weight / weight.mean(axis=1, keepdims=True)
    return np.clip(prob, 0.0, 1.0), level


def synthetic_counts(
    n_cells: int,
    n_genes: int = 2000,
    *,
    density: float = 0.05,
    n_types: int = 8,
    seed: int = 0,
) -> ad.AnnData:
    """A random sparse count matrix with cell types, built directly in CSR form.

    Each cell gets a type; a gene is non-zero in a cell with a type- and gene-specific
    probability (about ``density`` on average, higher for the type's marker genes),
    and a non-zero value is ``1 + Geometric``-distributed with a type- and
    gene-specific mean. The matrix is generated in chunks of cells with vectorised
    NumPy and is never dense: 1,000,000 x 2,000 at 5 % non-zeros needs about 1 GB
    for the result.

    Parameters
    ----------
    n_cells
        Number of cells (>= 1).
    n_genes
        Number of genes (>= 1).
    density
        Expected fraction of non-zero entries, in ``(0, 1]``.
    n_types
        Number of cell types (>= 1).
    seed
        Seed of the random generator.

    Returns
    -------
    AnnData with ``X`` a float32 ``scipy.sparse.csr_matrix`` of integer counts
    (>= 1 where stored), ``obs["cell_type"]`` categorical (``type_0``, ...) and gene
    names ``gene_0``, ...

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    n_cells, n_genes, n_types = int(n_cells), int(n_genes), int(n_types)
    if n_cells < 1 or n_genes < 1:
        msg = f"n_cells and n_genes must be >= 1, received {n_cells} and {n_genes}"
        raise ValueError(msg)
    if n_types < 1:
        msg = f"n_types must be >= 1, received {n_types}"
        raise ValueError(msg)
    if not 0.0 < density <= 1.0:
        msg = f"density must be in (0, 1], received {density}"
        raise ValueError(msg)

    rng = np.random.default_rng(seed)
    prob, level = _type_profiles(rng, n_types, n_genes, density)
    # Detection thresholds on 16-bit uniforms: four uniforms per 64-bit draw.
    threshold = np.minimum(np.rint(prob * 65536.0), 65535).astype(np.uint16)
    # log of the geometric "failure" probability giving the wanted mean 'level'.
    log_q = np.log1p(-1.0 / level).astype(np.float32)
    cell_type = rng.integers(0, n_types, size=n_cells)

    # The non-zeros go straight into buffers sized for the expected count plus a margin
    # of many standard deviations, so the result is never held twice (as chunks and as
    # their concatenation); a buffer grows only in the very unlikely case it is full.
    expected = float(prob.sum(axis=1)[cell_type].sum())
    capacity = int(expected + 10.0 * np.sqrt(expected) + 1024)
    index_dtype = np.int32 if capacity < np.iinfo(np.int32).max else np.int64
    data = np.empty(capacity, dtype=np.float32)
    indices = np.empty(capacity, dtype=index_dtype)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    chunk = max(1, _CHUNK_VALUES // n_genes)
    filled = 0
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        types = cell_type[start:stop]
        n_values = (stop - start) * n_genes
        raw = rng.bit_generator.random_raw(-(-n_values // 4))
        uniforms = raw.view(np.uint16)[:n_values].reshape(stop - start, n_genes)
        hit = uniforms < threshold[types]
        flat = np.flatnonzero(hit)
        del hit, uniforms, raw
        rows, cols = np.divmod(flat, n_genes)
        del flat
        u = 1.0 - rng.random(rows.size, dtype=np.float32)  # in (0, 1]
        # Inverse-CDF geometric on {1, 2, ...}: 1 + floor(log(u) / log(q)).
        values = 1.0 + np.floor(np.log(u) / log_q[types[rows], cols])
        end = filled + rows.size
        if end > data.size:
            data = np.resize(data, 2 * end)
            indices = np.resize(indices, 2 * end)
        data[filled:end] = values
        indices[filled:end] = cols
        filled = end
        indptr[start + 1 : stop + 1] = indptr[start] + np.cumsum(np.bincount(rows, minlength=stop - start))
        del rows, cols, u, values

    matrix = sp.csr_matrix(
        (data[:filled], indices[:filled], indptr.astype(index_dtype)), shape=(n_cells, n_genes)
    )
    type_names = [f"type_{t}" for t in range(n_types)]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(cell_type, categories=type_names)},
        index=pd.Index(np.char.add("cell_", np.arange(n_cells).astype(str)).astype(object)),
    )
    var = pd.DataFrame(index=pd.Index(np.char.add("gene_", np.arange(n_genes).astype(str)).astype(object)))
    return ad.AnnData(X=matrix, obs=obs, var=var)
