"""Datasets over AnnData: modes, index gathering, views and sparse storage."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from step._constants import ITEM_KEYS, MODES
from step.utils.dataset import BaseDataset, MaskedDataset, ScDataset, StDataset

EXPECTED_KEYS = {
    "expr": {"x", "library", "index"},
    "batch": {"x", "library", "index", "batch"},
    "class": {"x", "library", "index", "batch", "label"},
    "spatial": {"x", "library", "index", "batch", "spatial"},
}
DTYPES = {
    ITEM_KEYS.X: torch.float32,
    ITEM_KEYS.LIBRARY: torch.float32,
    ITEM_KEYS.BATCH: torch.int64,
    ITEM_KEYS.LABEL: torch.int64,
    ITEM_KEYS.SPATIAL: torch.float32,
    ITEM_KEYS.INDEX: torch.int64,
}


@pytest.fixture
def full(small_counts) -> BaseDataset:
    return BaseDataset(small_counts, batch_key="batch", class_key="bulk_labels")


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_give_keys_dtypes_and_shapes(full, mode):
    full.set_mode(mode)
    assert set(full.item_keys) == EXPECTED_KEYS[mode]
    batch = full[[3, 0, 7]]
    assert set(batch) == EXPECTED_KEYS[mode]
    for key, value in batch.items():
        assert value.dtype == DTYPES[key], key
        assert value.shape[0] == 3
    assert batch["x"].shape == (3, full.n_genes)
    if mode == "spatial":
        assert batch["spatial"].shape == (3, 2)
    item = full[5]
    assert set(item) == EXPECTED_KEYS[mode]
    assert item["x"].shape == (full.n_genes,)
    assert item["library"].shape == () and item["index"].item() == 5
    for key, value in item.items():
        assert value.dtype == DTYPES[key]


def test_set_mode_returns_previous_mode(full):
    assert full.mode == "expr"
    assert full.set_mode("class") == "expr"
    assert full.set_mode("spatial") == "class"
    assert full.set_mode("batch") == "spatial"
    assert full.mode == "batch"
    assert full.available_modes == tuple(MODES)


def test_bad_modes_raise(small_counts):
    ds = BaseDataset(small_counts, spatial_key=None)
    with pytest.raises(ValueError, match="unknown mode"):
        ds.set_mode("graph")
    with pytest.raises(ValueError, match="class_key"):
        ds.set_mode("class")
    with pytest.raises(ValueError, match="spatial"):
        ds.set_mode("spatial")
    assert ds.mode == "expr"
    assert ds.available_modes == ("expr", "batch")
    with pytest.raises(ValueError, match="unknown mode"):
        BaseDataset(small_counts, mode="all")
    no_coords = small_counts.copy()
    del no_coords.obsm["spatial"]
    with pytest.raises(ValueError, match="no 'spatial' entry"):
        BaseDataset(no_coords, mode="spatial")


def test_gather_equals_dense_slicing(full, small_counts):
    full.set_mode("class")
    dense = small_counts.X.toarray()
    idx = np.array([17, 3, 3, 119, 0, 64])
    for as_index in (idx, idx.tolist(), torch.as_tensor(idx), torch.as_tensor(idx, dtype=torch.int32)):
        batch = full[as_index]
        np.testing.assert_array_equal(batch["x"].numpy(), dense[idx])
        np.testing.assert_array_equal(batch["index"].numpy(), idx)
        np.testing.assert_allclose(batch["library"].numpy(), dense[idx].sum(axis=1))
    np.testing.assert_array_equal(full[[-1, -120]]["x"].numpy(), dense[[119, 0]])
    np.testing.assert_array_equal(full[10:20:3]["x"].numpy(), dense[10:20:3])
    mask = np.zeros(120, dtype=bool)
    mask[[5, 9]] = True
    np.testing.assert_array_equal(full[mask]["index"].numpy(), [5, 9])
    empty = full[[]]
    assert empty["x"].shape == (0, full.n_genes)
    np.testing.assert_array_equal(full[np.int64(4)]["x"].numpy(), dense[4])
    np.testing.assert_array_equal(full[torch.tensor(4)]["x"].numpy(), dense[4])


def test_gathered_tensors_do_not_alias_storage(full):
    batch = full[[0, 1]]
    batch["x"].zero_()
    batch["library"].zero_()
    assert full[[0, 1]]["library"].min() > 0
    assert full[[0, 1]]["x"].sum() > 0


def test_bad_indices_raise(full):
    with pytest.raises(IndexError):
        full[120]
    with pytest.raises(IndexError):
        full[[0, 500]]
    with pytest.raises(IndexError):
        full[[-121]]
    with pytest.raises(IndexError):
        full[np.zeros(5, dtype=bool)]
    with pytest.raises(IndexError):
        full[[0.5, 1.0]]
    with pytest.raises(IndexError):
        full[np.zeros((2, 2), dtype=int)]
    with pytest.raises(TypeError):
        full[True]


def test_labels_are_codes_with_category_order_kept(small_counts):
    a = small_counts
    a.obs["batch"] = pd.Categorical(a.obs["batch"], categories=["c", "b", "a"])
    ds = BaseDataset(a, batch_key="batch", class_key="bulk_labels")
    assert ds.batch_categories == ["c", "b", "a"] and ds.n_batches == 3
    np.testing.assert_array_equal(ds.batch_codes[[0, 40, 80]], [1, 2, 0])
    assert ds.batch_codes.dtype == np.int64
    assert ds.class_categories == list(a.obs["bulk_labels"].cat.categories)
    assert ds.n_classes == len(ds.class_categories)
    np.testing.assert_array_equal(ds.class_codes, a.obs["bulk_labels"].cat.codes.to_numpy())
    # a plain string column is encoded with sorted categories
    a.obs["batch"] = a.obs["batch"].astype(str)
    ds = BaseDataset(a, batch_key="batch")
    assert ds.batch_categories == ["a", "b", "c"]
    ds.set_mode("batch")
    np.testing.assert_array_equal(ds[[0, 40, 80]]["batch"].numpy(), [1, 0, 2])


def test_no_batch_key_gives_one_batch(small_counts):
    ds = BaseDataset(small_counts)
    assert ds.n_batches == 1 and ds.batch_categories == ["0"]
    assert not ds.batch_codes.any()
    assert ds.class_codes is None and ds.class_categories is None and ds.n_classes == 0


def test_missing_labels_raise(small_counts):
    small_counts.obs["batch"] = pd.Categorical(small_counts.obs["batch"])
    small_counts.obs.iloc[3, small_counts.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match="1 missing"):
        BaseDataset(small_counts, batch_key="batch")


def test_views_compose_and_share_data(full, small_counts):
    dense = small_counts.X.toarray()
    first = np.arange(10, 110, 2)
    view = full.subset(first)
    assert isinstance(view, MaskedDataset) and isinstance(view, BaseDataset)
    second = np.array([0, 7, 3, 49])
    inner = view.subset(second)
    assert inner.root is full and view.root is full
    np.testing.assert_array_equal(inner.indices, first[second])
    assert len(inner) == 4 and inner.n_genes == full.n_genes
    batch = inner[[0, 1, 2, 3]]
    np.testing.assert_array_equal(batch["x"].numpy(), dense[first[second]])
    np.testing.assert_array_equal(batch["index"].numpy(), [0, 1, 2, 3])  # positions in the view
    np.testing.assert_array_equal(inner.library, full.library[first[second]])
    np.testing.assert_array_equal(inner.batch_codes, full.batch_codes[first[second]])
    assert list(inner.obs_names) == list(small_counts.obs_names[first[second]])
    assert inner.X.shape == (4, full.n_genes)
    np.testing.assert_array_equal(inner.X.toarray(), dense[first[second]])
    # no copy of the matrix: the view reads the root's storage
    assert not hasattr(inner, "_X") or inner._X is full._X
    assert full.X is full._X
    # boolean masks and negative positions work for views too
    np.testing.assert_array_equal(view.subset(np.arange(len(view)) < 2).indices, first[:2])
    np.testing.assert_array_equal(view.subset([-1]).indices, first[-1:])


def test_views_own_their_mode(full):
    full.set_mode("batch")
    view = full.subset([1, 2, 3])
    assert view.mode == "batch"
    assert view.set_mode("class") == "batch"
    assert full.mode == "batch"
    assert set(view[[0]]) == EXPECTED_KEYS["class"]
    assert set(full[[0]]) == EXPECTED_KEYS["batch"]
    assert MaskedDataset(full, [0], mode="spatial").mode == "spatial"
    with pytest.raises(TypeError):
        MaskedDataset(full, 3)


def test_obs_rows_for_stratification(full, small_counts):
    view = full.subset([5, 2, 90])
    obs = view.obs
    pd.testing.assert_frame_equal(obs, small_counts.obs.iloc[[5, 2, 90]])
    obs["new"] = 1
    assert "new" not in full.obs.columns and "new" not in small_counts.obs.columns
    pd.testing.assert_frame_equal(full.obs, small_counts.obs)


def test_sparse_storage_is_kept(small_counts):
    ds = BaseDataset(small_counts)
    assert isinstance(ds.X, sp.csr_matrix) and ds.X.dtype == np.float32
    # CSR float32 input is referenced, not copied
    assert np.shares_memory(ds.X.data, small_counts.X.data)
    dense_input = small_counts.copy()
    dense_input.X = small_counts.X.toarray().astype(np.int64)
    ds = BaseDataset(dense_input)
    assert isinstance(ds.X, sp.csr_matrix) and ds.X.dtype == np.float32
    assert ds.X.nnz == small_counts.X.nnz
    csc_input = small_counts.copy()
    csc_input.X = sp.csc_matrix(small_counts.X, dtype=np.float64)
    ds = BaseDataset(csc_input)
    assert isinstance(ds.X, sp.csr_matrix) and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds[[0, 1]]["x"].numpy(), small_counts.X[[0, 1]].toarray())


def test_layer_is_read_when_given(small_counts):
    a = small_counts
    a.X = sp.csr_matrix(np.log1p(a.layers["counts"].toarray()))
    with pytest.raises(ValueError, match="non-integer"):
        BaseDataset(a)
    ds = BaseDataset(a, layer="counts")
    assert ds.layer == "counts"
    np.testing.assert_array_equal(ds[[2]]["x"].numpy(), a.layers["counts"][[2]].toarray())


def test_metadata(full, small_counts):
    assert list(full.var_names) == list(small_counts.var_names)
    assert list(full.obs_names) == list(small_counts.obs_names)
    assert len(full) == 120 and full.n_genes == 765
    np.testing.assert_array_equal(full.indices, np.arange(120))
    assert full.spatial.dtype == np.float32 and full.spatial.shape == (120, 2)
    np.testing.assert_allclose(full.spatial, small_counts.obsm["spatial"].astype(np.float32))
    assert "BaseDataset(n_obs=120" in repr(full)
    with pytest.raises(ValueError):
        full.library[0] = 5.0  # exposed arrays are read-only


def test_sc_and_st_datasets(small_counts):
    sc_ds = ScDataset(small_counts, batch_key="batch")
    assert sc_ds.spatial is None and "spatial" not in sc_ds.available_modes
    with pytest.raises(AttributeError):
        sc_ds.section_codes
    st = StDataset(small_counts, batch_key="batch", mode="spatial")
    np.testing.assert_array_equal(st.section_codes, st.batch_codes)
    assert st.section_categories == ["a", "b", "c"] and st.n_sections == 3
    view = st.subset([0, 50, 100])
    np.testing.assert_array_equal(view.section_codes, [1, 0, 2])
    assert view[[0, 1]]["spatial"].shape == (2, 2)
    no_coords = small_counts.copy()
    del no_coords.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        StDataset(no_coords)


def test_spatial_counts_fixture_builds_a_spatial_dataset(spatial_counts):
    st = StDataset(spatial_counts, batch_key="section", class_key="domain_true", mode="spatial")
    assert st.n_sections == 3 and st.n_classes == 4
    batch = st[np.arange(0, 2700, 300)]
    assert batch["spatial"].shape == (9, 2)
    np.testing.assert_array_equal(batch["batch"].numpy(), np.repeat([0, 1, 2], 3))


def test_zero_count_cells_warn(small_counts):
    a = small_counts
    x = a.X.tolil()
    x[4, :] = 0
    a.X = x.tocsr()
    with pytest.warns(UserWarning, match="1 of 120 cells have no counts"):
        ds = BaseDataset(a)
    assert ds.library[4] == 0


def test_dataset_pickles(full):
    full.set_mode("class")
    again = pickle.loads(pickle.dumps(full.subset([3, 4])))
    assert again.mode == "class"
    np.testing.assert_array_equal(again[[0, 1]]["x"].numpy(), full[[3, 4]]["x"].numpy())


def test_mixed_index_types_are_stored_as_one(small_counts):
    # anndata often writes int64 row pointers next to int32 column indices; scipy then
    # recasts both whole arrays on every row selection, so the dataset stores one type
    mixed = sp.csr_matrix(small_counts.X)
    mixed.indptr = mixed.indptr.astype(np.int64)
    mixed.indices = mixed.indices.astype(np.int32)
    adata = small_counts.copy()
    adata.X = mixed
    assert adata.X.indptr.dtype != adata.X.indices.dtype
    dataset = ScDataset(adata)
    stored = dataset.X
    assert stored.indptr.dtype == stored.indices.dtype == np.int32
    idx = np.array([7, 2, 99, 2])
    np.testing.assert_array_equal(dataset[idx]["x"].numpy(), small_counts.X.toarray()[idx])
