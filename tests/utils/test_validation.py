"""Bad inputs raise clear errors and never modify the AnnData object."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from step.utils.dataset import BaseDataset, ScDataset, StDataset
from step.utils.preprocess import prepare_counts
from step.utils.validation import check_batch_size, check_counts, get_counts

CONSUMERS = {
    "BaseDataset": lambda a, **kw: BaseDataset(a, **kw),
    "ScDataset": lambda a, **kw: ScDataset(a, **kw),
    "StDataset": lambda a, **kw: StDataset(a, **kw),
    "prepare_counts": lambda a, **kw: prepare_counts(a, **{k: v for k, v in kw.items() if k != "class_key"}),
}


def _corrupt(adata: ad.AnnData, value: float, *, dense: bool, n: int = 3) -> ad.AnnData:
    x = adata.X.toarray()
    rows, cols = np.nonzero(x)
    x[rows[:n], cols[:n]] = value
    adata.X = x if dense else sp.csr_matrix(x)
    return adata


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (-1.0, "3 negative entries"),
        (2.5, "3 non-integer entries"),
        (np.nan, "3 NaN or infinite entries"),
        (np.inf, "3 NaN or infinite entries"),
    ],
)
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_bad_counts_raise_and_leave_adata_intact(small_counts, unchanged, consumer, value, pattern, dense):
    adata = _corrupt(small_counts, value, dense=dense)
    check = unchanged(adata)
    with pytest.raises(ValueError, match=pattern) as info:
        CONSUMERS[consumer](adata)
    assert "e.g." in str(info.value) and "cell 0" in str(info.value)
    check()


def test_bad_counts_in_a_layer_are_named(small_counts, unchanged):
    small_counts.layers["counts"] = small_counts.layers["counts"] * 0.5
    check = unchanged(small_counts)
    with pytest.raises(ValueError, match=r"layers\['counts'\] holds \d+ non-integer"):
        BaseDataset(small_counts, layer="counts")
    check()


def test_check_counts_reports_position_and_accepts_integers():
    x = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, -2]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"1 negative entries \(e\.g\. .*-2.* at cell 1, gene 2\)"):
        check_counts(x)
    with pytest.raises(ValueError, match="at cell 1, gene 2"):
        check_counts(x.tocsc())
    with pytest.raises(ValueError, match="at cell 1, gene 2"):
        check_counts(x.tocoo())
    check_counts(np.array([[0, 3], [1, 2]], dtype=np.int64))
    check_counts(sp.csr_matrix((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="negative"):
        check_counts(np.array([[0, -3]], dtype=np.int32))
    with pytest.raises(TypeError, match="numeric"):
        check_counts(np.array([["a", "b"]]))


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_missing_layer_is_named_with_alternatives(small_counts, unchanged, consumer):
    check = unchanged(small_counts)
    with pytest.raises(KeyError, match=r"layer 'raw_counts' not found.*available layers: 'counts'"):
        CONSUMERS[consumer](small_counts, layer="raw_counts")
    check()


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_missing_batch_key_is_named_with_alternatives(small_counts, unchanged, consumer):
    check = unchanged(small_counts)
    with pytest.raises(KeyError, match=r"batch_key 'sample' not found.*'bulk_labels'.*'batch'"):
        CONSUMERS[consumer](small_counts, batch_key="sample")
    check()


@pytest.mark.parametrize("consumer", ["BaseDataset", "ScDataset", "StDataset"])
def test_missing_class_key_is_named_with_alternatives(small_counts, unchanged, consumer):
    check = unchanged(small_counts)
    with pytest.raises(KeyError, match=r"class_key 'cell_type' not found.*'louvain'"):
        CONSUMERS[consumer](small_counts, class_key="cell_type")
    check()


def test_missing_coordinates_are_named(small_counts, unchanged):
    small_counts.obsm["X_umap"] = np.zeros((small_counts.n_obs, 2))
    check = unchanged(small_counts)
    with pytest.raises(KeyError, match=r"spatial_key 'coords' not found.*'spatial', 'X_umap'"):
        StDataset(small_counts, spatial_key="coords")
    check()


@pytest.mark.parametrize("shape", [(0, 765), (120, 0)])
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_empty_data_raise(small_counts, unchanged, consumer, shape):
    empty = small_counts[: shape[0], : shape[1]].copy()
    check = unchanged(empty)
    with pytest.raises(ValueError, match="empty"):
        CONSUMERS[consumer](empty)
    check()


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_non_anndata_input_raises_type_error(consumer):
    with pytest.raises(TypeError, match="AnnData"):
        CONSUMERS[consumer](np.ones((3, 3)))


def test_x_none_points_to_layers(small_counts):
    a = ad.AnnData(obs=small_counts.obs, var=small_counts.var, layers={"counts": small_counts.X})
    with pytest.raises(ValueError, match="adata.X is None.*'counts'"):
        get_counts(a)
    assert get_counts(a, "counts") is a.layers["counts"]


def test_valid_input_leaves_adata_intact(small_counts, unchanged):
    check = unchanged(small_counts)
    ds = StDataset(small_counts, batch_key="batch", class_key="bulk_labels", mode="class")
    ds[[0, 1, 2]]
    ds.subset([1, 2]).obs["x"] = 1
    prepare_counts(small_counts, n_top_genes=50, batch_key="batch")
    prepare_counts(small_counts, layer="counts", genes=list(small_counts.var_names[:10]))
    check()


@pytest.mark.parametrize("size", [0, -1, -100])
def test_check_batch_size_rejects_non_positive(size):
    with pytest.raises(ValueError, match=f"received {size}"):
        check_batch_size(size)


def test_check_batch_size_accepts_numpy_integers():
    assert check_batch_size(np.int64(32)) == 32
    with pytest.raises(TypeError):
        check_batch_size(32.0)
