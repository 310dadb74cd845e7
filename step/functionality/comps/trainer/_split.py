"""Random (optionally stratified) train/validation splits of a dataset, without touching AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from step.utils.dataset import BaseDataset, MaskedDataset


def _check_split_rate(split_rate: float) -> float:
    if not 0.0 <= float(split_rate) < 1.0:
        msg = f"split_rate must lie in [0, 1), got {split_rate!r}."
        raise ValueError(msg)
    return float(split_rate)


def split_positions(
    n: int,
    split_rate: float,
    labels: pd.Series | np.ndarray | None = None,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly assign positions ``0..n-1`` to train and validation.

    With ``labels`` the split is made inside every category: a category of ``m`` items
    sends ``round(m * split_rate)`` of them to validation, but at least one item to each
    side when ``split_rate > 0``. Categories with a single item cannot be split and raise.

    Returns
    -------
    The sorted train and validation positions.
    """
    split_rate = _check_split_rate(split_rate)
    if n == 0:
        msg = "cannot split an empty dataset."
        raise ValueError(msg)
    if labels is None:
        groups = [np.arange(n)]
    else:
        codes, uniques = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), sort=True)
        if (codes < 0).any():
            msg = f"{int((codes < 0).sum())} items have a missing category; fill or drop them."
            raise ValueError(msg)
        counts = np.bincount(codes, minlength=len(uniques))
        single = [str(uniques[i]) for i in np.flatnonzero(counts == 1)]
        if single and split_rate > 0:
            msg = (
                f"categories {single} have a single member and cannot appear in both the "
                "training and the validation split; merge or drop them, or split by "
                "another key."
            )
            raise ValueError(msg)
        order = np.argsort(codes, kind="stable")
        groups = np.split(order, np.cumsum(counts)[:-1])
    valid_parts = []
    for members in groups:
        m = len(members)
        n_valid = int(round(m * split_rate))
        if split_rate > 0 and m >= 2:
            n_valid = min(max(n_valid, 1), m - 1)
        valid_parts.append(rng.permutation(members)[:n_valid])
    valid = np.sort(np.concatenate(valid_parts)) if valid_parts else np.empty(0, np.int64)
    train_mask = np.ones(n, dtype=bool)
    train_mask[valid] = False
    return np.flatnonzero(train_mask), valid.astype(np.int64)


def _make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        # draw from numpy's global state so that a seeded session stays reproducible;
        # under data-parallel training every process takes rank 0's draw, so that all
        # share one split
        from . import _distributed as ddp

        seed = ddp.broadcast_int(int(np.random.randint(0, 2**31 - 1)))
    return np.random.default_rng(seed)


def category_random_split(
    dataset: BaseDataset | MaskedDataset,
    split_rate: float = 0.2,
    obs_key: str | None = None,
    *,
    seed: int | np.random.Generator | None = None,
) -> tuple[MaskedDataset, MaskedDataset]:
    """Split a dataset into random training and validation views.

    Parameters
    ----------
    dataset
        The dataset (or a view of one) to split.
    split_rate
        Fraction of items that go to validation, in ``[0, 1)``.
    obs_key
        Column of the dataset's ``obs`` whose categories are split separately
        (stratified); ``None`` splits all items at random.
    seed
        Seed or generator; ``None`` draws one from NumPy's global state.

    Returns
    -------
    Two views of ``dataset`` (train, validation). The AnnData behind the dataset is not
    modified: the split lives only in the views' indices.
    """
    labels = None
    if obs_key is not None:
        obs = dataset.obs
        if obs_key not in obs.columns:
            msg = f"obs_key {obs_key!r} is not a column of obs; available: {list(obs.columns)}."
            raise KeyError(msg)
        labels = obs[obs_key].to_numpy()
    train_pos, valid_pos = split_positions(len(dataset), split_rate, labels, rng=_make_rng(seed))
    return dataset.subset(train_pos), dataset.subset(valid_pos)


def make_loaders(
    dataset: BaseDataset | MaskedDataset,
    batch_size: int,
    split_rate: float = 0.2,
    shuffle: bool = True,
    obs_key: str | None = None,
    *,
    seed: int | None = None,
    **kwargs: Any,
) -> tuple[DataLoader, DataLoader | None]:
    """Split ``dataset`` and return (train, validation) index-batch loaders.

    The validation loader is ``None`` when ``split_rate`` is 0. Extra keyword arguments go
    to :func:`step.utils.dataset.index_loader`. Under data-parallel training (an initialised
    process group) every process draws the same split, even without a seed, and the
    Trainer's loops give each process its own share of the batches.
    """
    from step.utils.dataset import index_loader

    if isinstance(batch_size, bool) or int(batch_size) < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise ValueError(msg)
    rng = _make_rng(seed)
    loader_seed = int(rng.integers(0, 2**31 - 1))
    if split_rate == 0:
        return index_loader(dataset, batch_size, shuffle=shuffle, seed=loader_seed, **kwargs), None
    train, valid = category_random_split(dataset, split_rate, obs_key, seed=rng)
    train_loader = index_loader(train, batch_size, shuffle=shuffle, seed=loader_seed, **kwargs)
    valid_loader = index_loader(valid, batch_size, shuffle=False, **kwargs)
    return train_loader, valid_loader

