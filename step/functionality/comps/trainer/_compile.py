"""Optional ``torch.compile`` of the loss computation, with a fallback to eager mode."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def check_compile(compile: bool | str | None) -> str | None:
    """The ``torch.compile`` mode of a ``compile`` setting, or None for no compilation.

    ``False``/None: off; ``True``: the default mode; a string: that mode (for example
    ``"reduce-overhead"``).
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile:
        return compile
    msg = f"compile must be False, True or a torch.compile mode string, got {compile!r}."
    raise ValueError(msg)


class LossCompiler:
    """Compile loss functions once and call them, or call them eagerly.

    Each function is compiled at its first call and reused after. If compiling or
    running a compiled function fails, one warning says why and this and every later
    call runs eagerly (an error of the function itself then surfaces from the eager
    call).

    Parameters
    ----------
    mode
        The ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ...) or None to
        run everything eagerly.
    """

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.failed = False
        self._compiled: dict[str, Callable] = {}

    @property
    def active(self) -> bool:
        """Whether calls go through compiled functions."""
        return self.mode is not None and not self.failed

    def __call__(self, name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, compiled under ``name`` when compilation is on."""
        if not self.active:
            return fn(*args, **kwargs)
        try:
            compiled = self._compiled.get(name)
            if compiled is None:
                mode = None if self.mode == "default" else self.mode
                compiled = self._compiled[name] = torch.compile(fn, mode=mode)
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back
            self.failed = True
            self._compiled.clear()
            warnings.warn(f"torch.compile is not usable here ({type(err).__name__}: "
                          f"{str(err).strip()[:200]}); training continues uncompiled.",
                          RuntimeWarning, stacklevel=2)
            return fn(*args, **kwargs)
