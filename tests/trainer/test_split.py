"""Random, seeded, stratified splits that never write into the AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from step.functionality.comps.trainer import Trainer, category_random_split, make_loaders
from step.utils.dataset import ScDataset


@pytest.fixture
def dataset(pbmc_counts):
    return ScDataset(pbmc_counts, class_key="bulk_labels")


def _positions(view):
    return np.asarray(view.indices)


def test_split_is_random_and_seeded(dataset):
    a_train, a_valid = category_random_split(dataset, 0.2, "bulk_labels", seed=1)
    b_train, b_valid = category_random_split(dataset, 0.2, "bulk_labels", seed=1)
    c_train, c_valid = category_random_split(dataset, 0.2, "bulk_labels", seed=2)
    assert np.array_equal(_positions(a_valid), _positions(b_valid))
    assert not np.array_equal(_positions(a_valid), _positions(c_valid))
    # not a slice of the unpermuted order: validation items are spread over each category
    labels = dataset.obs["bulk_labels"].to_numpy()
    for cat in np.unique(labels):
        members = np.flatnonzero(labels == cat)
        chosen = np.intersect1d(members, _positions(a_valid))
        if len(members) >= 10:
            assert not np.array_equal(chosen, members[: len(chosen)])
            assert not np.array_equal(chosen, members[-len(chosen):])


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.35])
def test_split_is_stratified(dataset, rate):
    train, valid = category_random_split(dataset, rate, "bulk_labels", seed=0)
    tr, va = _positions(train), _positions(valid)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(dataset)
    labels = pd.Series(dataset.obs["bulk_labels"].to_numpy())
    for cat, n in labels.value_counts().items():
        n_valid = int((labels.iloc[va] == cat).sum())
        n_train = int((labels.iloc[tr] == cat).sum())
        if n >= 2:
            assert n_valid >= 1 and n_train >= 1, cat
        assert abs(n_valid - rate * n) <= 1, (cat, n_valid, rate * n)


def test_split_leaves_adata_untouched(pbmc_counts):
    before = pbmc_counts.obs.copy()
    ds = ScDataset(pbmc_counts, class_key="bulk_labels")
    train, valid = category_random_split(ds, 0.2, "bulk_labels", seed=0)
    category_random_split(valid, 0.5, "bulk_labels", seed=0)  # views split again, freshly
    pd.testing.assert_frame_equal(pbmc_counts.obs, before)
    assert list(pbmc_counts.obs.columns) == list(before.columns)


def test_unstratified_split_and_bad_input(dataset):
    train, valid = category_random_split(dataset, 0.25, seed=0)
    assert len(valid) == round(0.25 * len(dataset))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="split_rate"):
            category_random_split(dataset, bad)
    with pytest.raises(KeyError, match="not_a_column"):
        category_random_split(dataset, 0.2, "not_a_column")


def test_singleton_category_is_a_clear_error(pbmc_counts):
    pbmc_counts.obs["odd"] = ["a"] * 699 + ["b"]
    ds = ScDataset(pbmc_counts)
    with pytest.raises(ValueError, match="single member"):
        category_random_split(ds, 0.2, "odd", seed=0)


def test_make_loaders_cover_the_dataset(dataset):
    train, valid = Trainer.make_loaders(dataset, 64, split_rate=0.2, obs_key="bulk_labels", seed=0)
    seen_train = np.concatenate([b["index"].numpy() for b in train])
    seen_valid = np.concatenate([b["index"].numpy() for b in valid])
    assert len(seen_train) + len(seen_valid) == len(dataset)
    assert max(len(b["index"]) for b in train) == 64
    t, v = make_loaders(dataset, 32, split_rate=0.0)
    assert v is None and sum(len(b["index"]) for b in t) == len(dataset)
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(dataset, 0)
