"""Mini-batch loop: one step per index batch of a (train, valid) loader pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._early_stopping import TOTAL_KEY
from .._running import RunningMeans

if TYPE_CHECKING:
    from .._trainer import EpochState, Trainer


def unpack_loaders(loaders: Any) -> tuple[Any, Any]:
    """Accept ``(train, valid)``, ``(train,)`` or a single loader."""
    if isinstance(loaders, (list, tuple)):
        if len(loaders) == 1:
            return loaders[0], None
        if len(loaders) == 2:
            return loaders[0], loaders[1]
        msg = f"loaders must be (train_loader, valid_loader); got {len(loaders)} items."
        raise ValueError(msg)
    if loaders is None:
        msg = "train_batch needs a training loader."
        raise ValueError(msg)
    return loaders, None


def run_epoch(
    trainer: Trainer, state: EpochState, loaders: Any, call_func: Callable | None
) -> tuple[dict[str, float], dict[str, float] | None]:
    train_loader, valid_loader = unpack_loaders(loaders)
    train_loader, valid_loader = trainer._cached(train_loader), trainer._cached(valid_loader)
    if call_func is None:
        trainer._require("loss", "train_batch")
    trainer._set_loader_epoch(train_loader, state.epoch)
    try:
        n_steps = len(train_loader)
    except TypeError:
        n_steps = None
    state.display.start_steps(n_steps)
    means = RunningMeans()
    for inputs in train_loader:
        loss_dict = trainer._compute(inputs, call_func)
        total = trainer.update_model_params(loss_dict, state.epoch)
        n = trainer._n_obs(inputs)
        means.add(loss_dict, n)
        means.add({TOTAL_KEY: total}, n)
        trainer._after_step(state, loss_dict)
    valid = None if valid_loader is None else trainer.validate_loader(valid_loader, call_func)
    return trainer._means(means), valid
