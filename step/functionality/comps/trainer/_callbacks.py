"""Duck-typed callbacks: any object with ``on_<stage>_<epoch|batch>_<start|end>`` methods."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

HOOKS = (
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_end",
    "on_validation_end",
    "on_train_epoch_end",
    "on_train_end",
)


def call_hook(callbacks: Iterable[Any], hook: str, **kwargs: Any) -> None:
    """Call ``hook`` on every callback that defines it.

    Keyword arguments the method does not accept are dropped, so a callback only needs to
    name what it uses (``def on_train_epoch_end(self, trainer): ...``).
    """
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if method is None:
            continue
        params = inspect.signature(method).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            method(**kwargs)
        else:
            method(**{k: v for k, v in kwargs.items() if k in params})
