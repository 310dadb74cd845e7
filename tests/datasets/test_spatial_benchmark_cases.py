"""Named spatial benchmark cases built from real PBMC cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from step.datasets import SPATIAL_BENCHMARK_CASES, spatial_benchmark_case
from step.datasets._benchmark import BENCHMARK_TYPES

NAMES = sorted(SPATIAL_BENCHMARK_CASES)


@pytest.fixture(scope="module")
def cases():
    return {name: spatial_benchmark_case(name, seed=0) for name in NAMES}


def _neighbour_counts(xy: np.ndarray) -> np.ndarray:
    """Number of other spots at distance 1 (the grid spacing) of each spot."""
    tree = cKDTree(xy)
    return np.array([len(tree.query_ball_point(p, 1.0 + 1e-6)) - 1 for p in xy])


def test_case_names_and_shapes(cases):
    assert len(NAMES) >= 3
    for name, a in cases.items():
        case = SPATIAL_BENCHMARK_CASES[name]
        rows, cols = case.shape
        assert a.shape == (case.n_sections * rows * cols, 765)
        sizes = a.obs["section"].value_counts()
        assert len(sizes) == case.n_sections
        assert (sizes == rows * cols).all() and 300 <= rows * cols <= 1000
        assert 7 <= case.n_domains <= 10
        assert list(a.obs["domain_true"].cat.categories) == [
            f"domain_{d}" for d in range(case.n_domains)]
        assert a.obs_names.is_unique
        assert a.uns["case"]["name"] == name
        assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    with pytest.raises(KeyError, match="unknown case"):
        spatial_benchmark_case("no_such_case")


def test_grid_geometry(cases):
    grids = {SPATIAL_BENCHMARK_CASES[n].grid for n in NAMES}
    assert grids == {"hex", "square"}
    for name, a in cases.items():
        case = SPATIAL_BENCHMARK_CASES[name]
        xy = a.obsm["spatial"][(a.obs["section"] == "section_0").to_numpy()]
        assert len({tuple(np.round(p, 6)) for p in xy}) == xy.shape[0]
        neighbours = _neighbour_counts(xy)
        # interior spots: 6 neighbours on the hexagonal grid, 4 on the square one
        expected = 6 if case.grid == "hex" else 4
        assert neighbours.max() == expected
        assert np.mean(neighbours == expected) > 0.75
        d, _ = cKDTree(xy).query(xy, k=2)
        np.testing.assert_allclose(d[:, 1], 1.0, atol=1e-9)


def test_domains_uneven_and_every_section_holds_most(cases):
    for name, a in cases.items():
        n_domains = SPATIAL_BENCHMARK_CASES[name].n_domains
        sizes = a.obs["domain_true"].value_counts()
        assert (sizes > 0).all() and len(sizes) == n_domains
        assert sizes.max() >= 3 * sizes.min(), (name, sizes.to_dict())
        for s in a.obs["section"].cat.categories:
            present = a.obs.loc[a.obs["section"] == s, "domain_true"].nunique()
            assert present >= n_domains - 1


def test_domains_share_cell_types(cases):
    for a in cases.values():
        props = a.uns["domain_proportions"]
        assert list(props.index) == list(BENCHMARK_TYPES)
        np.testing.assert_allclose(props.sum(axis=0).to_numpy(), 1.0)
        assert (props.to_numpy() > 0).all()
        # markers of monocytes, B cells and NK/cytotoxic cells are found in every domain
        x = a[:, ["LYZ", "CD79A", "NKG7"]].X.toarray()
        by_domain = pd.DataFrame(x > 0).groupby(a.obs["domain_true"].to_numpy()).mean()
        assert (by_domain.to_numpy() > 0.05).all()


def test_expression_alone_identifies_domains_poorly(cases):
    """Domains differ only in proportions: PCA + k-means is far from perfect, and
    averaging each spot over its grid neighbours improves it."""
    a = cases["cortex_hex"]
    truth = a.obs["domain_true"].cat.codes.to_numpy()
    x = a.X.toarray()
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    pcs = PCA(20, random_state=0).fit_transform(x)
    k = SPATIAL_BENCHMARK_CASES["cortex_hex"].n_domains
    raw = adjusted_rand_score(truth, KMeans(k, n_init=10, random_state=0).fit_predict(pcs))
    xy = a.obsm["spatial"]
    _, nb = cKDTree(xy).query(xy, k=7)
    smooth = pcs[nb].mean(axis=1)
    smoothed = adjusted_rand_score(truth, KMeans(k, n_init=10, random_state=0).fit_predict(smooth))
    assert raw < 0.4
    assert smoothed > raw + 0.05


def test_section_effect(cases):
    for name, a in cases.items():
        case = SPATIAL_BENCHMARK_CASES[name]
        if case.n_sections == 1:
            assert case.section_effect == 0
            continue
        assert case.section_effect > 0
        x = a.X.toarray()
        s = a.obs["section"].cat.codes.to_numpy()
        m0, m1 = x[s == 0].mean(axis=0), x[s == 1].mean(axis=0)
        keep = (m0 > 1) & (m1 > 1)
        ratio = np.log(m1[keep] / m0[keep])
        # per-gene factors: gene ratios between sections spread well beyond sampling noise
        assert ratio.std() > 0.15, ratio.std()
        if case.values == "counts":
            # sequencing depth of the second section is 0.6 times the first one's
            depth = x[s == 1].sum(axis=1).mean() / x[s == 0].sum(axis=1).mean()
            assert 0.45 < depth < 0.8


def test_values_are_integers_and_rounded_normalized(cases):
    for name, a in cases.items():
        case = SPATIAL_BENCHMARK_CASES[name]
        data = a.X.data
        np.testing.assert_array_equal(data, np.round(data))
        assert data.min() >= 1
        totals = np.asarray(a.X.sum(axis=1)).ravel()
        spread = totals.std() / totals.mean()
        if case.values == "rounded_normalized":
            assert spread < 0.05  # every spot scaled to the median total, then rounded
        else:
            assert spread > 0.2
    assert {SPATIAL_BENCHMARK_CASES[n].values for n in NAMES} == {"counts", "rounded_normalized"}


def test_deterministic_from_seed():
    a = spatial_benchmark_case("layers_st_sections", seed=3)
    b = spatial_benchmark_case("layers_st_sections", seed=3)
    c = spatial_benchmark_case("layers_st_sections", seed=4)
    assert (a.X != b.X).nnz == 0
    assert (a.obs["domain_true"] == b.obs["domain_true"]).all()
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert (a.X != c.X).nnz > 0
    assert (a.obs["domain_true"] != c.obs["domain_true"]).any()
