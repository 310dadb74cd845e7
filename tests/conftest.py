"""Shared fixtures: real PBMC counts loaded once per session, copied per test."""

from __future__ import annotations

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
