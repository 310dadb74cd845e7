"""Data layer: torch datasets over AnnData, preprocessing and input checks."""

from __future__ import annotations

from step.utils.block_sampler import BlockBatchSampler
from step.utils.dataset import (
    BaseDataset,
    IndexBatchSampler,
    MaskedDataset,
    ScDataset,
    StDataset,
    index_loader,
)
from step.utils.ondisk import OnDiskDataset
from step.utils.preprocess import prepare_counts
from step.utils.row_runs import contiguous_runs, read_rows
from step.utils.store_order import write_in_order
from step.utils.streaming import embed_to_h5ad

__all__ = [
    "BaseDataset",
    "BlockBatchSampler",
    "IndexBatchSampler",
    "MaskedDataset",
    "OnDiskDataset",
    "ScDataset",
    "StDataset",
    "contiguous_runs",
    "embed_to_h5ad",
    "index_loader",
    "prepare_counts",
    "read_rows",
    "write_in_order",
]
