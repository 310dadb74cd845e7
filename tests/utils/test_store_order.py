"""Writing a store in a new row order by chunks, reading rows run by run, coordinates from disk."""

from __future__ import annotations


import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from step.datasets import spatial_benchmark_case
from step.graph import spatial_order
from step.utils import OnDiskDataset, StDataset, contiguous_runs, write_in_order
from step.utils.row_runs import read_rows



def _read(path) -> ad.AnnData:
    return ad.read_zarr(path) if str(path).endswith(".zarr") else ad.read_h5ad(path)


@pytest.fixture(scope="module")
def spatial_files(tmp_path_factory, write_store):
    """Two sections of real cells in shuffled row order, with a layer and a spot graph."""
    adata = spatial_benchmark_case("layers_st_sections", seed=0)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.obsp["neighbours"] = sp.random(adata.n_obs, adata.n_obs, density=0.01, format="csr",
                                         random_state=0)
    root = tmp_path_factory.mktemp("store_order")
    return adata, write_store(adata, root / "in.h5ad"), write_store(adata, root / "in.zarr")


def _same_matrix(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0


@pytest.mark.parametrize(("source", "suffix"), [(1, ".h5ad"), (2, ".zarr"), (1, ".zarr")])
def test_written_store_is_the_data_in_the_new_order(spatial_files, tmp_path, source, suffix):
    adata = spatial_files[0]
    order = spatial_order(adata.obsm["spatial"], adata.obs["section"])
    out = write_in_order(spatial_files[source], tmp_path / f"out{suffix}", order, chunk_rows=97)
    written, expected = _read(out), adata[order]
    assert _same_matrix(written.X, expected.X)
    assert _same_matrix(written.layers["counts"], expected.layers["counts"])
    assert _same_matrix(written.obsp["neighbours"], expected.obsp["neighbours"])
    assert written.obs.equals(expected.obs) and written.var.equals(adata.var)
    assert np.array_equal(written.obsm["spatial"], expected.obsm["spatial"])
    assert set(written.uns) == set(adata.uns)
    # and the source is untouched
    assert _same_matrix(_read(spatial_files[source]).X, adata.X)


def test_in_memory_anndata_and_bad_input(spatial_files, tmp_path, write_store):
    adata = spatial_files[0]
    order = np.random.default_rng(2).permutation(adata.n_obs)
    out = write_in_order(adata, tmp_path / "mem.h5ad", order)
    assert _same_matrix(_read(out).X, adata[order].X)
    with pytest.raises(FileExistsError):
        write_in_order(spatial_files[1], out, order)
    with pytest.raises(ValueError, match="exactly once"):
        write_in_order(spatial_files[1], tmp_path / "dup.h5ad", np.zeros(adata.n_obs, int))
    with pytest.raises(ValueError, match="permutation"):
        write_in_order(spatial_files[1], tmp_path / "short.h5ad", order[:-1])
    dense = adata.copy()
    dense.X = dense.X.toarray()
    path = write_store(dense, tmp_path / "dense.h5ad")
    with pytest.raises(ValueError, match="CSR"):
        write_in_order(path, tmp_path / "dense_out.h5ad", order)


def test_contiguous_runs_and_reading_by_runs(spatial_files):
    assert contiguous_runs([]).shape == (0, 2)
    assert contiguous_runs([3, 4, 5, 9, 11, 12]).tolist() == [[3, 6], [9, 10], [11, 13]]
    adata, path, zpath = spatial_files
    rows = np.unique(np.r_[np.arange(10, 40), np.arange(100, 130), [300, 302, 500]])
    with h5py.File(path, "r") as f:
        _check_reads(f["X"], adata.X, rows)
    _check_reads(zarr.open(zpath, mode="r")["X"], adata.X, rows)


def _check_reads(group, counts, rows) -> None:
    indptr = np.asarray(group["indptr"][:])
    n_cols = counts.shape[1]
    expected = sp.csr_matrix(counts[rows], dtype=np.float32)
    # joined into few reads, or every run read on its own: the same rows
    for gap in (0, 10**6):
        got = read_rows(group, indptr, rows, n_cols, max_gap=gap)
        assert got.dtype == np.float32 and _same_matrix(got, expected)
    scattered = np.arange(0, 200, 3)
    got = read_rows(group, indptr, scattered, n_cols, max_gap=200)
    assert _same_matrix(got, sp.csr_matrix(counts[scattered], dtype=np.float32))
    empty = np.flatnonzero(np.diff(counts.indptr) == 0)[:3]
    if empty.size:
        assert read_rows(group, indptr, empty, n_cols).nnz == 0


def test_ondisk_dataset_reads_coordinates(spatial_files):
    adata, path, zpath = spatial_files
    memory = StDataset(adata, batch_key="section", spatial_key="spatial", mode="spatial")
    for p in (path, [path, zpath]):
        disk = OnDiskDataset(p, batch_key="section", spatial_key="spatial", mode="spatial")
        n = len(memory)
        idx = np.arange(len(disk)) % n
        assert np.array_equal(disk.spatial[: n], memory.spatial)
        item = disk[idx[5:50]]
        ref = memory[idx[5:50]]
        assert item.keys() == ref.keys()
        assert all(np.array_equal(item[k].numpy(), ref[k].numpy()) for k in ("x", "library", "batch", "spatial"))
    with pytest.raises(KeyError, match="obsm"):
        OnDiskDataset(path, spatial_key="xy")
