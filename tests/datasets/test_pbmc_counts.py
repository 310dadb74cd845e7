"""Integer counts recovered from scanpy's shipped PBMC data."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from step.datasets import pbmc68k_counts


@pytest.fixture(scope="module")
def shipped() -> sc.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.datasets.pbmc68k_reduced()


def test_counts_are_sparse_nonnegative_integers(pbmc_counts):
    x = pbmc_counts.X
    assert isinstance(x, sp.csr_matrix)
    assert x.dtype == np.float32
    assert pbmc_counts.shape == (700, 765)
    assert x.data.min() >= 1  # no stored zeros
    np.testing.assert_array_equal(x.data, np.round(x.data))


def test_counts_reproduce_shipped_lognormalised_values(pbmc_counts, shipped):
    counts = pbmc_counts.X.toarray().astype(np.float64)
    n_counts = pbmc_counts.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    expected = shipped.raw.X.toarray()
    # raw.X is stored rounded to three decimals, hence the tolerance.
    np.testing.assert_allclose(np.log1p(counts / n_counts * 1e4), expected, rtol=0, atol=1e-3)
    assert pbmc_counts.X.nnz == sp.csr_matrix(shipped.raw.X).nnz


def test_gene_totals_are_below_full_library(pbmc_counts):
    totals = np.asarray(pbmc_counts.X.sum(axis=1)).ravel()
    assert np.all(totals > 0)
    assert np.all(totals < pbmc_counts.obs["n_counts"].to_numpy())


def test_labels_and_names_are_kept(pbmc_counts, shipped):
    assert list(pbmc_counts.obs.columns) == ["bulk_labels", "louvain", "phase", "n_counts"]
    for key in ("bulk_labels", "louvain", "phase"):
        col = pbmc_counts.obs[key]
        assert isinstance(col.dtype, pd.CategoricalDtype)
        assert list(col.cat.categories) == [str(c) for c in shipped.obs[key].cat.categories]
        np.testing.assert_array_equal(col.astype(str).to_numpy(), shipped.obs[key].astype(str).to_numpy())
    assert pbmc_counts.obs["n_counts"].dtype == np.float32
    assert list(pbmc_counts.obs_names) == list(shipped.obs_names)
    assert list(pbmc_counts.var_names) == list(shipped.raw.var_names)
    assert not pbmc_counts.layers and not pbmc_counts.obsm and not pbmc_counts.uns


def test_each_call_returns_an_independent_copy():
    first = pbmc68k_counts()
    first.X.data[:] = 0
    first.obs["bulk_labels"] = "changed"
    second = pbmc68k_counts()
    assert second.X.data.min() >= 1
    assert "changed" not in set(second.obs["bulk_labels"].astype(str))
