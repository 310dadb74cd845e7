"""Batch sources: what the Trainer's loops iterate over, one small class per kind of data."""

from .base import Batch, BatchSource, Shard
from .graphs import GraphBatchSource, SubgraphSource
from .matrix import FullMatrixSource, MiniBatchSource

__all__ = [
    "Batch",
    "BatchSource",
    "FullMatrixSource",
    "GraphBatchSource",
    "MiniBatchSource",
    "Shard",
    "SubgraphSource",
]
