"""Helpers for the data-layer tests: small AnnData objects and an unchanged-check."""

from __future__ import annotations

import copy
from collections.abc import Callable

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp


def _same_matrix(a, b) -> bool:
    if sp.issparse(a) != sp.issparse(b):
        return False
    if sp.issparse(a):
        if a.format != b.format or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return (
            np.array_equal(a.data, b.data, equal_nan=True)
            and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.indptr, b.indptr)
        )
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def assert_adata_unchanged(before: ad.AnnData, after: ad.AnnData) -> None:
    """Check obs, var, X, layers, obsm and uns are identical."""
    assert after.shape == before.shape
    assert after.obs.equals(before.obs) and list(after.obs.columns) == list(before.obs.columns)
    assert after.var.equals(before.var)
    for key in before.obs.columns:
        assert after.obs[key].dtype == before.obs[key].dtype
    assert _same_matrix(before.X, after.X)
    assert set(after.layers.keys()) == set(before.layers.keys())
    for key in before.layers:
        assert _same_matrix(before.layers[key], after.layers[key])
    assert set(after.obsm.keys()) == set(before.obsm.keys())
    for key in before.obsm:
        assert _same_matrix(before.obsm[key], after.obsm[key])
    assert set(after.uns.keys()) == set(before.uns.keys())


@pytest.fixture
def unchanged() -> Callable[[ad.AnnData], Callable[[], None]]:
    """``check = unchanged(adata)`` snapshots ``adata``; ``check()`` asserts it is intact."""

    def snapshot(adata: ad.AnnData) -> Callable[[], None]:
        before = adata.copy()
        before.uns = copy.deepcopy(dict(adata.uns))
        return lambda: assert_adata_unchanged(before, adata)

    return snapshot


@pytest.fixture
def small_counts(pbmc_counts) -> ad.AnnData:
    """120 real cells with a batch column, a layer, coordinates and uns, for quick tests."""
    a = pbmc_counts[:120].copy()
    a.obs["batch"] = np.repeat(["b", "a", "c"], 40)
    a.layers["counts"] = a.X.copy()
    rng = np.random.default_rng(0)
    a.obsm["spatial"] = rng.random((a.n_obs, 2)) * 10
    a.uns["note"] = {"kept": 1}
    return a
