"""Full-batch loop: the whole (training part of the) matrix in one step per epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._early_stopping import TOTAL_KEY
from .._running import RunningMeans

if TYPE_CHECKING:
    from .._trainer import EpochState, Trainer


def _all_inputs(trainer: Trainer, X: Any) -> dict[str, torch.Tensor]:
    key = id(X)
    cached = trainer._full_cache.get(key)
    if cached is None:
        if hasattr(X, "subset"):  # a dataset: gather every item once
            inputs = X[np.arange(len(X))]
        else:
            inputs = trainer._as_inputs(X)
        cached = trainer.to_device(inputs)
        trainer._full_cache[key] = cached
    return cached


def gather(trainer: Trainer, X: Any, ind: Any = None) -> dict[str, torch.Tensor]:
    """The inputs of rows ``ind`` of ``X`` on the trainer's device (all rows when None)."""
    inputs = _all_inputs(trainer, X)
    if ind is None:
        return inputs
    ind = torch.as_tensor(np.asarray(ind), dtype=torch.long, device=trainer.device)
    n = len(inputs["x"])
    if ind.numel() == 0:
        msg = "the index set is empty."
        raise ValueError(msg)
    if int(ind.min()) < 0 or int(ind.max()) >= n:
        msg = f"indices must lie in [0, {n}); got range [{int(ind.min())}, {int(ind.max())}]."
        raise IndexError(msg)
    return {k: v.index_select(0, ind) if torch.is_tensor(v) and v.dim() > 0 and len(v) == n
            else v for k, v in inputs.items()}


def run_epoch(
    trainer: Trainer, state: EpochState, X: Any, train_ind: Any, valid_ind: Any,
    call_func: Callable | None, **kwargs: Any,
) -> tuple[dict[str, float], dict[str, float] | None]:
    if call_func is None:
        trainer._require("loss", "train")
    inputs = gather(trainer, X, train_ind)
    if kwargs:
        inputs = {**inputs, **kwargs}
    loss_dict = trainer._compute(inputs, call_func)
    total = trainer.update_model_params(loss_dict, state.epoch)
    means = RunningMeans()
    means.add(loss_dict)
    means.add({TOTAL_KEY: total})
    trainer._after_step(state, loss_dict)
    valid = None if valid_ind is None else trainer.validate_X(X, valid_ind, call_func)
    return trainer._means(means), valid
