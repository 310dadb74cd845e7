"""anndata elements copied from .h5ad and .zarr into .h5ad read back as the originals."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata.io import read_elem, write_elem

from step.utils.store_copy import copy_element, write_obs_frame


@pytest.fixture(scope="module")
def elements(_pbmc_counts_session) -> dict:
    obs = _pbmc_counts_session.obs.copy()
    obs["flag"] = pd.array(np.arange(len(obs)) % 3 == 0, dtype="boolean")
    obs["count"] = pd.array(np.where(np.arange(len(obs)) % 7 == 0, None, 1), dtype="Int64")
    obs["name"] = [f"cell {i}" for i in range(len(obs))]
    return {
        "obs": obs,
        "empty": pd.DataFrame(index=obs.index[:5]),
        "matrix": sp.csr_matrix(_pbmc_counts_session.X[:50]),
        "dense": np.arange(12, dtype=np.float32).reshape(4, 3),
    }


def _open(path):
    if str(path).endswith(".zarr"):
        import zarr

        return zarr.open_group(str(path), mode="w")
    return h5py.File(path, "w")


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
@pytest.mark.parametrize("name", ["obs", "empty", "matrix", "dense"])
def test_copies_read_back_equal(elements, tmp_path, kind, name):
    source = _open(tmp_path / f"source.{kind}")
    write_elem(source, name, elements[name])
    with h5py.File(tmp_path / "target.h5ad", "w") as target:
        copy_element(source[name], target, name, step=37)  # many small slices
        copied = read_elem(target[name])
    expected = elements[name]
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(copied, expected)
    elif sp.issparse(expected):
        assert (copied != expected).nnz == 0 and copied.dtype == expected.dtype
    else:
        np.testing.assert_array_equal(copied, expected)


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_a_slice_of_rows_of_a_dataframe(elements, tmp_path, kind):
    source = _open(tmp_path / f"source.{kind}")
    write_elem(source, "obs", elements["obs"])
    write_elem(source, "matrix", elements["matrix"])
    with h5py.File(tmp_path / "target.h5ad", "w") as target:
        copy_element(source["obs"], target, "obs", rows=slice(100, 250), step=29)
        copied = read_elem(target["obs"])
        with pytest.raises(ValueError, match="not in a 'csr_matrix'"):
            copy_element(source["matrix"], target, "m", rows=slice(0, 5))
        with pytest.raises(ValueError, match="step 1"):
            copy_element(source["obs"], target, "o", rows=slice(0, 5, 2))
    pd.testing.assert_frame_equal(copied, elements["obs"].iloc[100:250])


def test_write_obs_frame_writes_as_anndata_does(tmp_path):
    obs = pd.DataFrame({"kind": ["a", "b", "a", "a"], "value": [1.0, 2.0, 3.0, 4.0],
                        "name": ["w", "x", "y", "z"]}, index=[10, 11, 12, 13])
    reference = ad.AnnData(obs=obs.set_axis(obs.index.astype(str)))
    reference.write_h5ad(tmp_path / "reference.h5ad")
    with h5py.File(tmp_path / "mine.h5", "w") as file:
        write_obs_frame(file, "obs", obs)
        mine = read_elem(file["obs"])
    pd.testing.assert_frame_equal(mine, ad.read_h5ad(tmp_path / "reference.h5ad").obs)
    assert isinstance(mine["kind"].dtype, pd.CategoricalDtype)
    assert obs["kind"].dtype == object and list(obs.index) == [10, 11, 12, 13]
