"""Spatial sections with known domains built from the real PBMC counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from step.datasets import spatial_sections_from_cells
from step.datasets._spatial import PBMC_DOMINANT_TYPES


def _grid_pairs(adata):
    """Pairs of spots that are horizontal or vertical grid neighbours in a section."""
    coords = adata.obsm["spatial"]
    sections = adata.obs["section"].cat.codes.to_numpy()
    key = {(s, x, y): i for i, (s, (x, y)) in enumerate(zip(sections, coords.astype(int)))}
    pairs = []
    for (s, x, y), i in key.items():
        for dx, dy in ((1, 0), (0, 1)):
            j = key.get((s, x + dx, y + dy))
            if j is not None:
                pairs.append((i, j))
    return np.array(pairs)


def test_layout_and_annotations(spatial_counts):
    a = spatial_counts
    assert a.shape == (3 * 30 * 30, 765)
    for key in ("section", "domain_true", "cell_type"):
        assert isinstance(a.obs[key].dtype, pd.CategoricalDtype)
    assert a.obs["section"].value_counts().to_dict() == {f"section_{s}": 900 for s in range(3)}
    assert list(a.obs["domain_true"].cat.categories) == [f"domain_{d}" for d in range(4)]
    coords = a.obsm["spatial"]
    assert coords.shape == (a.n_obs, 2) and np.issubdtype(coords.dtype, np.floating)
    for s in a.obs["section"].cat.categories:
        mask = (a.obs["section"] == s).to_numpy()
        assert len({tuple(c) for c in coords[mask]}) == 900
        # every section holds every domain, none tiny
        sizes = a.obs.loc[mask, "domain_true"].value_counts()
        assert sizes.min() >= 0.5 * 900 / 4
    assert a.obs_names.is_unique


def test_counts_are_thinned_integers(spatial_counts, pbmc_counts):
    x = spatial_counts.X
    assert isinstance(x, sp.csr_matrix) and x.dtype == np.float32
    np.testing.assert_array_equal(x.data, np.round(x.data))
    assert x.data.min() >= 1
    src = pbmc_counts[spatial_counts.obs["source_cell"].to_numpy()].X
    diff = (src - x).toarray()
    assert diff.min() >= 0  # thinning only removes molecules
    kept = x.sum() / src.sum()
    assert 0.77 < kept < 0.83
    assert (spatial_counts.obs["cell_type"].astype(str).to_numpy()
            == pbmc_counts.obs.loc[spatial_counts.obs["source_cell"], "bulk_labels"].astype(str).to_numpy()).all()
    # repeated draws of one cell are not identical
    dup = spatial_counts.obs["source_cell"].duplicated(keep=False).to_numpy()
    first = spatial_counts.obs["source_cell"].to_numpy()
    cell = first[dup][0]
    rows = np.flatnonzero(first == cell)
    assert (x[rows[0]] != x[rows[1]]).nnz > 0


def test_domains_are_contiguous(spatial_counts):
    pairs = _grid_pairs(spatial_counts)
    domain = spatial_counts.obs["domain_true"].cat.codes.to_numpy()
    same = np.mean(domain[pairs[:, 0]] == domain[pairs[:, 1]])
    assert same > 0.9


def test_domains_mix_cell_types_around_a_dominant_one(spatial_counts):
    tab = pd.crosstab(spatial_counts.obs["domain_true"], spatial_counts.obs["cell_type"], normalize="index")
    for d, dominant in enumerate(PBMC_DOMINANT_TYPES[:4]):
        row = tab.loc[f"domain_{d}"]
        assert row.idxmax() == dominant
        assert 0.5 < row[dominant] < 0.7
        assert (row > 0).sum() >= 5
    props = spatial_counts.uns["domain_proportions"]
    np.testing.assert_allclose(props.sum(axis=0), 1.0)
    for d, dominant in enumerate(PBMC_DOMINANT_TYPES[:4]):
        assert props[f"domain_{d}"].idxmax() == dominant


def test_sections_write_to_h5ad_without_warnings(spatial_counts, tmp_path):
    import warnings

    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spatial_counts.write_h5ad(tmp_path / "sections.h5ad")
    back = ad.read_h5ad(tmp_path / "sections.h5ad")
    pd.testing.assert_frame_equal(back.uns["domain_proportions"],
                                  spatial_counts.uns["domain_proportions"], check_names=False)


def test_neighbour_averaging_reveals_domains(spatial_counts):
    """One spot identifies its domain weakly, a spatial average identifies it well."""
    a = spatial_counts
    x = a.X.toarray()
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    z = PCA(20, svd_solver="randomized", random_state=0).fit_transform(x)
    sections = a.obs["section"].cat.codes.to_numpy()
    smoothed = np.empty_like(z)
    for s in np.unique(sections):
        idx = np.flatnonzero(sections == s)
        nn = NearestNeighbors(n_neighbors=19).fit(a.obsm["spatial"][idx])  # about two rings
        _, nb = nn.kneighbors(a.obsm["spatial"][idx])
        smoothed[idx] = z[idx][nb].mean(axis=1)
    truth = a.obs["domain_true"].cat.codes.to_numpy()
    raw = adjusted_rand_score(truth, KMeans(4, n_init=2, random_state=0).fit_predict(z))
    smooth = adjusted_rand_score(truth, KMeans(4, n_init=2, random_state=0).fit_predict(smoothed))
    assert raw < 0.5
    assert smooth > 0.8


def test_deterministic_for_a_seed():
    a = spatial_sections_from_cells(n_sections=2, grid=(12, 10), n_domains=3, seed=5)
    b = spatial_sections_from_cells(n_sections=2, grid=(12, 10), n_domains=3, seed=5)
    c = spatial_sections_from_cells(n_sections=2, grid=(12, 10), n_domains=3, seed=6)
    assert a.shape == (240, 765)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert not a.obs["domain_true"].equals(c.obs["domain_true"])
    # layouts differ between sections
    d0 = a.obs["domain_true"].to_numpy()[:120]
    d1 = a.obs["domain_true"].to_numpy()[120:]
    assert (d0 != d1).any()


def test_custom_source_and_dominant_types(pbmc_counts):
    src = pbmc_counts[pbmc_counts.obs["bulk_labels"].isin(["CD19+ B", "CD14+ Monocyte", "CD56+ NK"])].copy()
    out = spatial_sections_from_cells(
        n_sections=1, grid=(10, 10), n_domains=2, source=src, dominant_types=["CD56+ NK", "CD19+ B"]
    )
    assert set(out.obs["cell_type"].astype(str)) <= {"CD19+ B", "CD14+ Monocyte", "CD56+ NK"}
    tab = pd.crosstab(out.obs["domain_true"], out.obs["cell_type"])
    assert tab.loc["domain_0"].idxmax() == "CD56+ NK"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"grid": (0, 5)}, ValueError),
        ({"grid": "big"}, ValueError),
        ({"n_sections": 0}, ValueError),
        ({"n_domains": 11}, ValueError),
        ({"n_domains": 0}, ValueError),
        ({"dominant_fraction": 0.0}, ValueError),
        ({"thinning": 1.5}, ValueError),
        ({"n_domains": 2, "dominant_types": ["CD19+ B", "CD19+ B"]}, ValueError),
        ({"n_domains": 2, "dominant_types": ["CD19+ B", "no such type"]}, KeyError),
        ({"cell_type_key": "missing"}, KeyError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        spatial_sections_from_cells(grid=kwargs.pop("grid", (6, 6)), **kwargs)
