"""Training of TranscriptFormer models: the Trainer, its loops, early stopping and splits."""

from __future__ import annotations

from ._checkpoint import read_checkpoint, seed_everything
from ._convergence import ConvergenceProbe
from ._early_stopping import EarlyStopping
from ._guard import NonFiniteError
from ._memory import ReleaseFreedMemory, reuse_freed_memory
from ._plan import TrainingPlan
from ._progress import train_loop_formatter
from ._signals import TrainingInterrupted
from ._split import category_random_split, make_loaders
from ._trainer import Trainer
from .sources import (
    Batch,
    BatchSource,
    FullMatrixSource,
    GraphBatchSource,
    MiniBatchSource,
    Shard,
    SubgraphSource,
)

__all__ = [
    "Batch",
    "BatchSource",
    "ConvergenceProbe",
    "EarlyStopping",
    "FullMatrixSource",
    "GraphBatchSource",
    "MiniBatchSource",
    "NonFiniteError",
    "ReleaseFreedMemory",
    "Shard",
    "SubgraphSource",
    "Trainer",
    "TrainingInterrupted",
    "TrainingPlan",
    "category_random_split",
    "make_loaders",
    "read_checkpoint",
    "reuse_freed_memory",
    "seed_everything",
    "train_loop_formatter",
]
