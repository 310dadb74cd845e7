"""Index-batch loading: coverage per epoch, reproducibility, batch contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step.utils.dataset import BaseDataset, IndexBatchSampler, index_loader


@pytest.fixture
def dataset(pbmc_counts) -> BaseDataset:
    return BaseDataset(pbmc_counts, batch_key="phase", mode="batch")


def _epoch(loader) -> list[np.ndarray]:
    return [b["index"].numpy() for b in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_per_epoch(dataset, shuffle):
    loader = index_loader(dataset, 64, shuffle=shuffle, seed=0)
    assert len(loader) == 11  # ceil(700 / 64)
    for _ in range(2):
        batches = _epoch(loader)
        assert len(batches) == 11
        assert [b.size for b in batches] == [64] * 10 + [60]
        seen = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(seen), np.arange(700))
        assert shuffle != np.array_equal(seen, np.arange(700))


def test_drop_last(dataset):
    loader = index_loader(dataset, 64, drop_last=True, seed=0)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 10
    assert all(b.size == 64 for b in batches)
    assert np.unique(np.concatenate(batches)).size == 640


def test_reproducible_by_seed(dataset):
    a = index_loader(dataset, 100, seed=7)
    b = index_loader(dataset, 100, seed=7)
    c = index_loader(dataset, 100, seed=8)
    a1, a2 = _epoch(a), _epoch(a)
    b1, b2 = _epoch(b), _epoch(b)
    for x, y in zip(a1 + a2, b1 + b2):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.concatenate(a1), np.concatenate(a2))  # reshuffled each epoch
    assert not np.array_equal(np.concatenate(a1), np.concatenate(_epoch(c)))


def test_unseeded_loader_follows_torch_manual_seed(dataset):
    torch.manual_seed(3)
    first = np.concatenate(_epoch(index_loader(dataset, 128)))
    torch.manual_seed(3)
    second = np.concatenate(_epoch(index_loader(dataset, 128)))
    np.testing.assert_array_equal(first, second)


def test_batches_match_direct_indexing(dataset, pbmc_counts):
    dense = pbmc_counts.X.toarray()
    codes = pbmc_counts.obs["phase"].cat.codes.to_numpy()
    for batch in index_loader(dataset, 256, seed=1):
        idx = batch["index"].numpy()
        assert set(batch) == {"x", "library", "index", "batch"}
        assert batch["x"].dtype == torch.float32 and batch["batch"].dtype == torch.int64
        np.testing.assert_array_equal(batch["x"].numpy(), dense[idx])
        np.testing.assert_array_equal(batch["batch"].numpy(), codes[idx])


def test_loader_over_a_view(dataset, pbmc_counts):
    view = dataset.subset(np.arange(0, 700, 7))
    seen = []
    for batch in index_loader(view, 32, seed=0):
        seen.append(batch["index"].numpy())
        np.testing.assert_array_equal(batch["x"].numpy(), pbmc_counts.X[view.indices[seen[-1]]].toarray())
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(100))


def test_sampler_state_resumes_the_shuffle(dataset):
    loader = index_loader(dataset, 50, seed=2)
    _epoch(loader)
    state = loader.sampler.state_dict()
    expected = _epoch(loader)
    loader.sampler.load_state_dict(state)
    for x, y in zip(_epoch(loader), expected):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("size", [0, -3])
def test_bad_batch_size(dataset, size):
    with pytest.raises(ValueError, match="batch_size"):
        index_loader(dataset, size)
    with pytest.raises(ValueError, match="batch_size"):
        IndexBatchSampler(10, size)


@pytest.mark.parametrize("size", [2.5, "8", True, None])
def test_batch_size_must_be_an_integer(dataset, size):
    with pytest.raises(TypeError, match="batch_size"):
        index_loader(dataset, size)


def test_empty_view_and_wrong_type(dataset):
    with pytest.raises(ValueError, match="empty"):
        index_loader(dataset.subset([]), 4)
    with pytest.raises(TypeError):
        index_loader(list(range(5)), 2)
