"""Per-term early stopping and the rule that turns several stoppers into one decision."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from step._constants import LOSS_KEYS
from step.utils.files import write_atomic

TOTAL_KEY = "total_loss"


@dataclass(frozen=True)
class StopDefaults:
    """Patience and minimum improvement used for one loss term."""

    patience: int
    delta: float


#: Defaults per loss term; any term not listed uses ``OTHER_STOP_DEFAULTS``.
TERM_STOP_DEFAULTS: dict[str, StopDefaults] = {
    LOSS_KEYS.RECON: StopDefaults(30, 1e-2),
    LOSS_KEYS.KL: StopDefaults(10, 1e-3),
    LOSS_KEYS.CL: StopDefaults(20, 1e-4),
    LOSS_KEYS.GATE: StopDefaults(15, 1e-3),
}
OTHER_STOP_DEFAULTS = StopDefaults(15, 1e-3)


def stop_defaults(term: str) -> StopDefaults:
    """Return the default patience/delta for ``term`` (``val_`` prefix ignored)."""
    return TERM_STOP_DEFAULTS.get(term.removeprefix("val_"), OTHER_STOP_DEFAULTS)


class EarlyStopping:
    """Track one monitored quantity and tell when it stopped improving.

    A value is an improvement only when it is lower than the best seen so far by more than
    ``delta``; equal values on a plateau count as no progress. Non-finite values never
    improve. After ``patience`` epochs without improvement :attr:`early_stop` is true.

    Parameters
    ----------
    patience
        Epochs without improvement tolerated before :attr:`early_stop` turns true.
    verbose
        Report every improvement through ``trace_func``.
    delta
        Minimum decrease that counts as an improvement (must be >= 0).
    path
        Optional file; when given and :meth:`__call__` receives a model, the model's
        weights are written there (atomically) at every improvement.
    trace_func
        Function used for messages (``print`` by default).
    name
        Name of the monitored quantity, used in messages.
    """

    def __init__(
        self,
        patience: int = 7,
        verbose: bool = False,
        delta: float = 0.0,
        path: str | os.PathLike | None = None,
        trace_func: Callable[[str], Any] = print,
        name: str = "loss",
    ) -> None:
        if int(patience) < 1:
            msg = f"patience must be a positive integer, got {patience!r}."
            raise ValueError(msg)
        if not delta >= 0:
            msg = f"delta must be >= 0, got {delta!r}."
            raise ValueError(msg)
        self.patience = int(patience)
        self.verbose = verbose
        self.delta = float(delta)
        self.path = path
        self.trace_func = trace_func
        self.name = name
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.best_score: float = math.inf
        self.best_epoch: int | None = None
        self.counter = 0
        self.last_epoch: int | None = None

    @property
    def early_stop(self) -> bool:
        """Whether ``patience`` epochs have passed without improvement."""
        return self.counter >= self.patience

    def step(self, value: float, epoch: int | None = None) -> bool:
        """Record ``value`` for ``epoch``; return whether it improved on the best."""
        value = float(value)
        self.last_epoch = epoch
        if math.isfinite(value) and value < self.best_score - self.delta:
            if self.verbose:
                self.trace_func(
                    f"{self.name} improved ({self.best_score:.6g} -> {value:.6g})."
                )
            self.best_score = value
            self.best_epoch = epoch
            self.counter = 0
            return True
        self.counter += 1
        return False

    def __call__(
        self, val_loss: float, model: torch.nn.Module | None = None, epoch: int | None = None
    ) -> bool:
        """Step with ``val_loss``; on improvement save ``model`` to :attr:`path` if both set."""
        improved = self.step(val_loss, epoch)
        if improved and model is not None and self.path is not None:
            save_atomic(model.state_dict(), self.path)
        return improved

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue tracking after a restart."""
        return {
            "patience": self.patience,
            "delta": self.delta,
            "name": self.name,
            "best_score": self.best_score,
            "best_epoch": -1 if self.best_epoch is None else self.best_epoch,
            "counter": self.counter,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.patience = int(state["patience"])
        self.delta = float(state["delta"])
        self.name = str(state["name"])
        self.best_score = float(state["best_score"])
        self.best_epoch = None if int(state["best_epoch"]) < 0 else int(state["best_epoch"])
        self.counter = int(state["counter"])

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(name={self.name!r}, patience={self.patience}, delta={self.delta}, "
            f"best={self.best_score:.6g}, counter={self.counter})"
        )


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see ``step.utils.files.write_atomic``)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


class StopRule:
    """Decide from a set of stoppers whether training ends.

    Parameters
    ----------
    rule
        ``"all"``: every stopper has run out of patience; ``"any"``: at least one has;
        any other string names the one monitored stopper that decides (e.g.
        ``"total_loss"`` or ``"recon_loss"``).
    """

    def __init__(self, rule: str = "all") -> None:
        if not isinstance(rule, str) or not rule:
            msg = f"stop rule must be 'all', 'any' or a loss term name, got {rule!r}."
            raise ValueError(msg)
        self.rule = rule.removeprefix("val_")

    @property
    def monitor(self) -> str | None:
        """The named term that decides, or None for ``all``/``any``."""
        return None if self.rule in ("all", "any") else self.rule

    def validate(self, terms: set[str] | list[str]) -> None:
        """Raise a KeyError when the named monitor is not among ``terms``."""
        if self.monitor is not None and self.monitor not in terms:
            msg = (
                f"stop rule monitors {self.monitor!r}, which is not a loss term of this "
                f"model; available terms: {sorted(terms)}."
            )
            raise KeyError(msg)

    def decide(self, stoppers: Mapping[str, EarlyStopping]) -> tuple[bool, list[str]]:
        """Return (stop?, names of the stoppers that caused it). No stoppers never stops."""
        if not stoppers:
            return False, []
        exhausted = [name for name, s in stoppers.items() if s.early_stop]
        if self.rule == "all":
            return len(exhausted) == len(stoppers), exhausted
        if self.rule == "any":
            return bool(exhausted), exhausted
        stopper = stoppers.get(self.monitor)
        if stopper is None:
            return False, []
        return stopper.early_stop, [self.monitor] if stopper.early_stop else []
