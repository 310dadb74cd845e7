"""Data layer: torch datasets over AnnData, preprocessing and input checks."""

from __future__ import annotations

from step.utils.dataset import (
    BaseDataset,
    IndexBatchSampler,
    MaskedDataset,
    ScDataset,
    StDataset,
    index_loader,
)
from step.utils.preprocess import prepare_counts

__all__ = [
    "BaseDataset",
    "IndexBatchSampler",
    "MaskedDataset",
    "ScDataset",
    "StDataset",
    "index_loader",
    "prepare_counts",
]
