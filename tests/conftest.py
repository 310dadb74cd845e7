"""Shared fixtures: real PBMC counts loaded once per session, copied per test."""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad
import pytest


@pytest.fixture(scope="session")
def _pbmc_counts_session() -> ad.AnnData:
    from step.datasets import pbmc68k_counts

    return pbmc68k_counts()


@pytest.fixture
def pbmc_counts(_pbmc_counts_session: ad.AnnData) -> ad.AnnData:
    """The 700 real PBMCs as integer counts (fresh copy per test)."""
    return _pbmc_counts_session.copy()


@pytest.fixture(scope="session")
def _spatial_session() -> ad.AnnData:
    from step.datasets import spatial_sections_from_cells

    return spatial_sections_from_cells(seed=0)


@pytest.fixture
def spatial_counts(_spatial_session: ad.AnnData) -> ad.AnnData:
    """Multi-section spatial data built from real PBMCs with known domains."""
    return _spatial_session.copy()


def _write_store(adata: ad.AnnData, path) -> str:
    """Write ``adata`` to ``path`` (``.zarr``: a zarr store, else ``.h5ad``); return the path."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(path) if str(path).endswith(".zarr") else adata.write_h5ad(path)
    return str(path)


@pytest.fixture(scope="session")
def write_store() -> Callable[[ad.AnnData, object], str]:
    """The function that writes an AnnData to an ``.h5ad`` file or ``.zarr`` store."""
    return _write_store
