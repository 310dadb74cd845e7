"""Rows read in aligned blocks equal rows read directly, and a block-shuffled epoch reads
each block from disk once."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from step.utils.block_cache import RowBlockCache
from step.utils.block_sampler import BlockBatchSampler
from step.utils.dataset import index_loader
from step.utils.ondisk import OnDiskDataset


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    return sp.random(503, 40, density=0.2, format="csr", random_state=0, dtype=np.float32)


class Recorder:
    def __init__(self, matrix):
        self.matrix, self.calls = matrix, []

    def __call__(self, rows):
        assert np.all(np.diff(rows) > 0)
        self.calls.append(rows.copy())
        return self.matrix[rows]


def test_cached_rows_equal_direct_rows(matrix):
    read = Recorder(matrix)
    cache = RowBlockCache(matrix.shape[0], 16, 8)
    rng = np.random.default_rng(0)
    for size in (1, 5, 40, 300, 503):
        rows = np.sort(rng.choice(matrix.shape[0], size, replace=False))
        got = cache.rows(rows, read)
        assert got.shape == (size, 40) and (got != matrix[rows]).nnz == 0
        assert len(cache) <= 8
    # every block read whole: 16 rows each, except the short last block
    assert all(len(c) % 16 == 0 or c[-1] == matrix.shape[0] - 1 for c in read.calls)


def test_cached_blocks_are_not_read_again_until_evicted(matrix):
    read = Recorder(matrix)
    cache = RowBlockCache(matrix.shape[0], 10, 3)
    cache.rows(np.array([0, 15, 25]), read)  # blocks 0, 1, 2
    cache.rows(np.array([3, 12, 29]), read)
    assert cache.blocks_read == 3 and len(read.calls) == 1
    cache.rows(np.array([40]), read)  # block 4 evicts block 0, the least recently used
    cache.rows(np.array([15]), read)
    assert cache.blocks_read == 4
    cache.rows(np.array([1]), read)
    assert cache.blocks_read == 5


def test_a_block_shuffled_epoch_reads_each_block_once(matrix):
    n, block = matrix.shape[0], 16
    read = Recorder(matrix)
    cache = RowBlockCache(n, block, 8)  # two buffers: a batch may span two
    sampler = BlockBatchSampler(n, 16, block_size=block, buffer_blocks=4, seed=0)
    seen = []
    for batch in sampler:
        rows = np.unique(batch)
        assert (cache.rows(rows, read) != matrix[rows]).nnz == 0
        seen.append(batch)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))
    assert cache.blocks_read == -(-n // block)
    # without the cache, the same epoch touches the blocks once per batch
    touched = sum(np.unique(b // block).size for b in seen)
    assert touched > 3 * cache.blocks_read


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_sizes_are_refused(value):
    with pytest.raises(ValueError, match="positive integer"):
        RowBlockCache(10, value, 2)
    with pytest.raises(ValueError, match="positive integer"):
        RowBlockCache(10, 2, value)


@pytest.fixture(scope="module")
def store(tmp_path_factory, _pbmc_counts_session, write_store):
    root = tmp_path_factory.mktemp("cache")
    return _pbmc_counts_session, write_store(_pbmc_counts_session, root / "pbmc.zarr")


def test_block_loader_on_disk_gives_the_batches_of_direct_reads(store):
    _, path = store
    dataset = OnDiskDataset(path)
    view = dataset.subset(np.sort(np.random.default_rng(1).choice(len(dataset), 560, replace=False)))
    cached = list(index_loader(view, 64, seed=2, block_size=32, buffer_blocks=4))
    dataset.set_read_blocks(None)  # read the same positions directly
    sampler = BlockBatchSampler(len(view), 64, block_size=32, buffer_blocks=4, seed=2)
    positions = list(sampler)
    assert len(positions) == len(cached) == 9
    for batch, rows in zip(cached, positions, strict=True):
        expected = view[rows]
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[k], expected[k]) for k in batch)


def test_the_dataset_holds_no_cell_names(store):
    adata, path = store
    dataset = OnDiskDataset(path)
    assert list(dataset.obs_names) == list(adata.obs_names)
    assert dataset.obs.equals(adata.obs)
    held = pickle.dumps(dataset)
    assert not any(name.encode() in held for name in adata.obs_names[:20])
