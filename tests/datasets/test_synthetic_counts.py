"""Large sparse synthetic counts for benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from step.datasets import synthetic_counts


@pytest.fixture(scope="module")
def synth():
    return synthetic_counts(4000, 500, density=0.05, n_types=5, seed=3)


def test_shape_density_and_storage(synth):
    assert synth.shape == (4000, 500)
    x = synth.X
    assert isinstance(x, sp.csr_matrix) and x.dtype == np.float32
    assert x.has_canonical_format
    assert abs(x.nnz / (4000 * 500) - 0.05) < 0.005
    assert x.data.min() >= 1
    np.testing.assert_array_equal(x.data, np.round(x.data))
    assert np.isfinite(x.data).all()
    assert list(synth.var_names[:2]) == ["gene_0", "gene_1"]
    assert synth.obs_names.is_unique


def test_cell_types_structure_the_counts(synth):
    types = synth.obs["cell_type"]
    assert isinstance(types.dtype, pd.CategoricalDtype)
    assert list(types.cat.categories) == [f"type_{t}" for t in range(5)]
    codes = types.cat.codes.to_numpy()
    assert np.bincount(codes).min() > 600
    x = synth.X.toarray()
    logx = np.log1p(x)
    # nearest centroid (fitted on half, tested on the other half) recovers the type
    train, test = np.arange(0, 4000, 2), np.arange(1, 4000, 2)
    centroids = np.stack([logx[train][codes[train] == t].mean(axis=0) for t in range(5)])
    dist = ((logx[test][:, None, :] - centroids[None]) ** 2).sum(axis=2)
    assert np.mean(dist.argmin(axis=1) == codes[test]) > 0.9


def test_deterministic_for_a_seed():
    a = synthetic_counts(300, 100, seed=1)
    b = synthetic_counts(300, 100, seed=1)
    c = synthetic_counts(300, 100, seed=2)
    assert (a.X != b.X).nnz == 0
    assert a.obs["cell_type"].equals(b.obs["cell_type"])
    assert (a.X != c.X).nnz > 0


def test_chunked_generation_matches_density(monkeypatch):
    import step.datasets._synthetic as mod

    monkeypatch.setattr(mod, "_CHUNK_VALUES", 1000)  # many small chunks
    a = mod.synthetic_counts(500, 64, density=0.2, seed=0)
    assert a.X.shape == (500, 64)
    assert abs(a.X.nnz / (500 * 64) - 0.2) < 0.02
    assert np.all(np.diff(a.X.indptr) >= 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_cells": 0}, {"n_cells": 10, "n_genes": 0}, {"n_cells": 10, "density": 0.0},
     {"n_cells": 10, "density": 1.5}, {"n_cells": 10, "n_types": 0}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_counts(**kwargs)
