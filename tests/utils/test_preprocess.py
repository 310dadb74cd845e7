"""prepare_counts: copies, gene lists and highly variable genes."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from step.utils.dataset import StDataset
from step.utils.preprocess import hvg_flavor, prepare_counts, select_genes

HAS_SKMISC = importlib.util.find_spec("skmisc") is not None


def test_returns_an_independent_sparse_copy(small_counts, unchanged):
    check = unchanged(small_counts)
    out = prepare_counts(small_counts)
    assert out is not small_counts
    assert isinstance(out.X, sp.csr_matrix) and out.X.dtype == np.float32
    assert not np.shares_memory(out.X.data, small_counts.X.data)
    assert (out.X != small_counts.X).nnz == 0
    assert not out.layers
    np.testing.assert_array_equal(out.obsm["spatial"], small_counts.obsm["spatial"])
    assert out.uns["note"] == {"kept": 1}
    out.X.data[:] = 0
    out.obs["bulk_labels"] = "x"
    out.obsm["spatial"][:] = -1
    out.uns["note"]["kept"] = 2
    check()


def test_counts_from_a_layer(small_counts):
    small_counts.X = sp.csr_matrix(np.log1p(small_counts.layers["counts"].toarray()))
    out = prepare_counts(small_counts, layer="counts")
    assert (out.X != small_counts.layers["counts"]).nnz == 0


def test_dense_counts_become_csr(small_counts):
    small_counts.X = small_counts.X.toarray().astype(np.int32)
    out = prepare_counts(small_counts)
    assert isinstance(out.X, sp.csr_matrix) and out.X.dtype == np.float32


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_highly_variable_genes(small_counts, batch_key):
    out = prepare_counts(small_counts, n_top_genes=60, batch_key=batch_key)
    assert out.n_vars == 60
    positions = small_counts.var_names.get_indexer(out.var_names)
    assert (positions >= 0).all() and np.all(np.diff(positions) > 0)  # original order kept
    np.testing.assert_array_equal(out.X.toarray(), small_counts[:, out.var_names].X.toarray())


def test_default_flavor_matches_scanpy(small_counts):
    out = prepare_counts(small_counts, n_top_genes=80)
    ref = small_counts.copy()
    if hvg_flavor() == "seurat":
        sc.pp.normalize_total(ref, target_sum=1e4)
        sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(ref, flavor=hvg_flavor(), n_top_genes=80, inplace=False)
    expected = small_counts.var_names[table["highly_variable"].to_numpy()]
    assert set(out.var_names) == set(expected)


@pytest.mark.skipif(HAS_SKMISC, reason="scikit-misc is installed")
def test_seurat_v3_without_scikit_misc_says_what_to_install(small_counts):
    assert hvg_flavor() == "seurat"
    with pytest.raises(ImportError, match="scikit-misc"):
        prepare_counts(small_counts, n_top_genes=10, flavor="seurat_v3")


def test_n_top_genes_at_or_above_gene_count_keeps_all(small_counts):
    assert prepare_counts(small_counts, n_top_genes=765).n_vars == 765
    assert prepare_counts(small_counts, n_top_genes=5000).n_vars == 765


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-5, ValueError), (2.0, TypeError)])
def test_bad_n_top_genes(small_counts, value, error):
    with pytest.raises(error, match="n_top_genes"):
        prepare_counts(small_counts, n_top_genes=value)


def test_bad_flavor(small_counts):
    with pytest.raises(ValueError, match="flavor"):
        prepare_counts(small_counts, n_top_genes=10, flavor="cell_ranger_v9")


def test_gene_list_keeps_given_order(small_counts):
    genes = [small_counts.var_names[i] for i in (40, 3, 700, 3)]
    out = prepare_counts(small_counts, genes=genes)
    assert list(out.var_names) == genes[:3]
    np.testing.assert_array_equal(out.X.toarray(), small_counts.X.toarray()[:, [40, 3, 700]])


def test_gene_list_partial_match_warns_and_keeps_intersection(small_counts, unchanged):
    check = unchanged(small_counts)
    genes = ["CD3D", "NOT_A_GENE", "ALSO_MISSING", small_counts.var_names[0]]
    with pytest.warns(UserWarning, match=r"2 of 4 requested genes are not in adata.var_names"):
        out = prepare_counts(small_counts, genes=genes)
    assert list(out.var_names) == ["CD3D", small_counts.var_names[0]]
    check()


def test_gene_list_then_highly_variable(small_counts):
    genes = list(small_counts.var_names[:200])
    out = prepare_counts(small_counts, genes=genes, n_top_genes=20)
    assert out.n_vars == 20 and set(out.var_names) <= set(genes)


@pytest.mark.parametrize(
    ("genes", "error", "pattern"),
    [
        (["NOPE1", "NOPE2"], ValueError, "none of the 2 requested genes"),
        ([], ValueError, "genes is empty"),
        ("CD3D", TypeError, "single string"),
    ],
)
def test_bad_gene_lists(small_counts, unchanged, genes, error, pattern):
    check = unchanged(small_counts)
    with pytest.raises(error, match=pattern):
        prepare_counts(small_counts, genes=genes)
    check()


def test_select_genes_with_duplicate_var_names(small_counts):
    names = small_counts.var_names.to_numpy().copy()
    names[10] = names[5]
    import pandas as pd

    assert select_genes(pd.Index(names), [names[5]]).tolist() == [5]


def test_output_feeds_a_spatial_dataset(spatial_counts):
    out = prepare_counts(spatial_counts, n_top_genes=100, batch_key="section")
    ds = StDataset(out, batch_key="section", mode="spatial")
    assert ds.n_genes == 100 and ds.n_sections == 3
