"""Training of TranscriptFormer models: the Trainer, early stopping, loops and splits."""

from __future__ import annotations

from ._checkpoint import read_checkpoint, seed_everything
from ._convergence import ConvergenceProbe
from ._early_stopping import EarlyStopping
from ._progress import train_loop_formatter
from ._split import category_random_split, make_loaders
from ._trainer import NonFiniteError, Trainer

__all__ = [
    "ConvergenceProbe",
    "EarlyStopping",
    "NonFiniteError",
    "Trainer",
    "category_random_split",
    "make_loaders",
    "read_checkpoint",
    "seed_everything",
    "train_loop_formatter",
]
