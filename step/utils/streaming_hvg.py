"""Highly variable genes of counts on disk, from one pass over blocks of rows.

The selection is the one :func:`step.utils.prepare_counts` makes in memory with the
``"seurat"`` flavour of :func:`scanpy.pp.highly_variable_genes` (counts normalised to
1e4 per cell and log1p-transformed; genes ranked by their normalised dispersion within
20 bins of mean expression; with batches, ranked by the number of batches that select
them, then by the mean normalised dispersion). Only per-gene sums are kept in memory:
the count of cells, the mean and the centred sum of squares of the normalised values per
batch, merged block by block, so the matrix is never loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["GeneMoments", "highly_variable_from_blocks"]

_TARGET_SUM = 1e4
_N_BINS = 20


class GeneMoments:
    """Per-group, per-gene mean and centred sum of squares, merged block by block.

    Parameters
    ----------
    n_groups
        Number of groups (batches) of cells.
    n_genes
        Number of genes.
    """

    def __init__(self, n_groups: int, n_genes: int) -> None:
        self.count = np.zeros(n_groups, dtype=np.int64)
        self.mean = np.zeros((n_groups, n_genes), dtype=np.float64)
        self.m2 = np.zeros((n_groups, n_genes), dtype=np.float64)
        self.expressed = np.zeros((n_groups, n_genes), dtype=np.int64)

    def add(self, values: sp.csr_matrix, groups: np.ndarray) -> None:
        """Add a block of rows (``values``, float32 CSR) whose cells are in ``groups``."""
        labels = np.unique(groups)
        for g in labels:
            part = values if labels.size == 1 else values[groups == g]
            n, n_genes = part.shape
            data, cols = part.data.astype(np.float64), part.indices
            mean = np.bincount(cols, weights=data, minlength=n_genes) / n
            stored = np.bincount(cols, minlength=n_genes)
            # sum over the block of (x - mean)^2, the zeros that are not stored included
            m2 = (np.bincount(cols, weights=(data - mean[cols]) ** 2, minlength=n_genes)
                  + (n - stored) * mean**2)
            self._merge(int(g), n, mean, m2)
            self.expressed[g] += np.bincount(cols[part.data > 0], minlength=n_genes)

    def _merge(self, g: int, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s pairwise update of the running mean and sum of squares."""
        before = self.count[g]
        total = before + n
        delta = mean - self.mean[g]
        self.mean[g] += delta * (n / total)
        self.m2[g] += m2 + delta**2 * (before * n / total)
        self.count[g] = total

    def variance(self) -> np.ndarray:
        """Unbiased variances (``ddof=1``), groups x genes."""
        n = self.count[:, None].astype(np.float64)
        return self.m2 / np.maximum(n - 1, 1)


def _normalised(block: sp.csr_matrix, totals: np.ndarray) -> sp.csr_matrix:
    """``expm1(log1p(counts / totals * 1e4))`` in float32, as scanpy computes it."""
    factor = (totals.astype(np.float32) / np.float32(_TARGET_SUM)).astype(np.float32)
    per_entry = np.repeat(factor, np.diff(block.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        data = np.where(per_entry > 0, block.data.astype(np.float32) / per_entry, 0)
    data = np.expm1(np.log1p(data.astype(np.float32)))
    return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)


def _dispersion_table(mean: np.ndarray, var: np.ndarray, genes: pd.Index) -> pd.DataFrame:
    """The "seurat" table: log mean, log dispersion and its normalisation within bins."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    table = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion}, index=genes)
    bins = pd.cut(table["means"], bins=_N_BINS)
    stats = table.groupby(bins, observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()  # one gene in its bin: normalised dispersion 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[bins].set_index(table.index)
    table["dispersions_norm"] = (table["dispersions"] - stats["avg"]) / stats["dev"]
    return table


def _top(score: np.ndarray, n_top: int) -> np.ndarray:
    """The genes at or above the ``n_top``-th highest score; ranked when ties add more."""
    finite = np.sort(score[~np.isnan(score)])[::-1]
    cutoff = finite[min(n_top, finite.size) - 1]
    mask = np.nan_to_num(score, nan=-np.inf) >= cutoff
    if mask.sum() != n_top:
        order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
        mask = np.zeros(score.size, dtype=bool)
        mask[order[:n_top]] = True
    return mask


def _batched(moments: GeneMoments, genes: pd.Index, n_top: int) -> np.ndarray:
    """Rank by the number of batches selecting a gene, then the mean normalised dispersion."""
    tables = []
    for g in range(moments.count.size):
        expressed = moments.expressed[g] > 0
        table = _dispersion_table(moments.mean[g, expressed], moments.variance()[g, expressed],
                                  genes[expressed])
        table["highly_variable"] = _top_plain(table["dispersions_norm"].to_numpy(), n_top)
        absent = pd.DataFrame(0.0, index=genes[~expressed], columns=table.columns)
        absent["highly_variable"] = False
        tables.append(pd.concat([table, absent]).loc[genes])
    table = pd.concat(tables, axis=0)
    table["highly_variable"] = table["highly_variable"].astype(int)
    table = table.groupby(table.index, observed=True).agg(
        {"dispersions_norm": "mean", "highly_variable": "sum"})
    table = table.sort_values(["highly_variable", "dispersions_norm"], ascending=False,
                              na_position="last")
    chosen = set(table.index[:n_top])
    return np.array([g in chosen for g in genes], dtype=bool)


def _top_plain(score: np.ndarray, n_top: int) -> np.ndarray:
    """Per-batch selection: every gene at or above the ``n_top``-th highest score."""
    finite = np.sort(score[~np.isnan(score)])[::-1]
    if finite.size == 0:
        return np.zeros(score.size, dtype=bool)
    return np.nan_to_num(score, nan=-np.inf) >= finite[min(n_top, finite.size) - 1]


def highly_variable_from_blocks(
    blocks: Iterable[tuple[int, sp.csr_matrix]],
    genes: Sequence[str],
    n_top_genes: int,
    *,
    batches: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes, from blocks of counts.

    Parameters
    ----------
    blocks
        ``(first_row, counts)`` pairs covering every cell once, e.g.
        :meth:`OnDiskDataset.iter_blocks <step.utils.ondisk.OnDiskDataset.iter_blocks>`.
    genes
        Gene names (the columns of every block).
    n_top_genes
        Genes to select (at least 1).
    batches
        Batch label of every cell (batch-aware selection); ``None`` for one batch.

    Returns
    -------
    Boolean mask over ``genes`` with ``n_top_genes`` entries set (all genes when there
    are fewer).
    """
    genes = pd.Index([str(g) for g in genes])
    if n_top_genes >= len(genes):
        return np.ones(len(genes), dtype=bool)
    if batches is None:
        codes, n_groups = None, 1
    else:
        # batches in sorted order, as scanpy visits the categories of a string column
        names, codes = np.unique(np.asarray(batches).astype(str), return_inverse=True)
        n_groups = names.size
    moments = GeneMoments(n_groups, len(genes))
    for start, block in blocks:
        block = sp.csr_matrix(block, dtype=np.float32)
        totals = np.asarray(block.sum(axis=1, dtype=np.float32)).reshape(-1)
        groups = (np.zeros(block.shape[0], dtype=np.int64) if codes is None
                  else codes[start:start + block.shape[0]])
        moments.add(_normalised(block, totals), groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if codes is None:
            table = _dispersion_table(moments.mean[0], moments.variance()[0], genes)
            return _top(table["dispersions_norm"].to_numpy(), n_top_genes)
        return _batched(moments, genes, n_top_genes)
