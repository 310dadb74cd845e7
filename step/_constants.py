"""Names shared across the package: loss terms, dataset modes and AnnData keys."""

from __future__ import annotations

from typing import NamedTuple


class _LossKeys(NamedTuple):
    RECON: str = "recon_loss"
    KL: str = "kl_loss"
    CL: str = "cl_loss"
    CONTRAST: str = "contrast_loss"
    RAW_RECON: str = "raw_recon_loss"
    GATE: str = "gate_loss"


LOSS_KEYS = _LossKeys()


class _Modes(NamedTuple):
    EXPR: str = "expr"
    BATCH: str = "batch"
    CLASS: str = "class"
    SPATIAL: str = "spatial"


MODES = _Modes()


class _ItemKeys(NamedTuple):
    """Keys of the dict that a dataset returns for an index batch."""

    X: str = "x"  # float32 counts, shape (n, n_genes)
    LIBRARY: str = "library"  # float32 total counts, shape (n,)
    BATCH: str = "batch"  # int64 batch codes, shape (n,)
    LABEL: str = "label"  # int64 class codes, shape (n,)
    SPATIAL: str = "spatial"  # float32 coordinates, shape (n, 2)
    INDEX: str = "index"  # int64 positions in the dataset, shape (n,)


ITEM_KEYS = _ItemKeys()


class _AdataKeys(NamedTuple):
    """The only keys that workflows write into a caller's AnnData."""

    X_REP: str = "X_rep"
    X_ANCHORED: str = "X_anchord"
    X_SMOOTHED: str = "X_smoothed"
    DOMAIN: str = "domain"


ADATA_KEYS = _AdataKeys()
