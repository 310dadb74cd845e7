"""The learning-rate schedule: built per loop, stepped per epoch, saved with the run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._early_stopping import TOTAL_KEY
from ._optim import default_milestones

KINDS = ("multistep", "plateau", "constant")


class Schedule:
    """Own the scheduler of the current optimizer.

    A built-in kind (``multistep``, ``plateau``, ``constant``) is rebuilt for each loop
    from its spec; a custom scheduler is kept as given. Both are saved and restored: the
    state of a custom scheduler is applied to the instance the user passes again (before
    or after loading the checkpoint).
    """

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {"kind": "multistep", "milestones": None, "gamma": 0.5}
        self.scheduler: Any = None
        self.pending: dict[str, Any] | None = None

    @property
    def custom(self) -> bool:
        return self.spec.get("kind") == "custom"

    def configure(self, *, kind: str = "multistep", milestones: Sequence[int] | None = None,
                  gamma: float = 0.5, monitor: str = TOTAL_KEY, factor: float = 0.5,
                  patience: int = 5, min_lr: float = 0.0) -> None:
        """Choose a built-in kind; it is built at the next loop start."""
        if kind not in KINDS:
            msg = f"kind must be 'multistep', 'plateau' or 'constant', got {kind!r}."
            raise ValueError(msg)
        if not 0 < gamma <= 1 or not 0 < factor < 1:
            msg = f"gamma must lie in (0, 1] and factor in (0, 1); got {gamma}, {factor}."
            raise ValueError(msg)
        self.spec = {
            "kind": kind,
            "milestones": None if milestones is None else sorted(int(m) for m in milestones),
            "gamma": float(gamma), "monitor": monitor.removeprefix("val_"),
            "factor": float(factor), "patience": int(patience), "min_lr": float(min_lr),
        }
        self.scheduler = None
        self.pending = None

    def set_custom(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        """Use ``scheduler`` (or ``factory(optimizer)``) and apply any saved state to it."""
        if callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer)
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            msg = "the scheduler belongs to another optimizer than the trainer's current one."
            raise ValueError(msg)
        self.scheduler = scheduler
        self.spec = {"kind": "custom"}
        if self.pending is not None:
            self.scheduler.load_state_dict(self.pending)
            self.pending = None

    def reset(self) -> None:
        """Forget the built-in scheduler so the next loop builds a fresh one."""
        if not self.custom:
            self.scheduler = None

    def forget(self) -> None:
        """The optimizer was replaced: no scheduler can be kept."""
        self.scheduler = None

    def ensure(self, optimizer: torch.optim.Optimizer, epochs: int) -> None:
        """Build the built-in scheduler for a loop of ``epochs`` epochs when missing."""
        if self.scheduler is not None:
            return
        if self.custom:
            msg = ("this run uses a custom learning-rate scheduler; pass it again with "
                   "set_lr_scheduler() before training.")
            raise RuntimeError(msg)
        self.scheduler = self._build(optimizer, epochs)
        if self.pending is not None:
            self.scheduler.load_state_dict(self.pending)
            self.pending = None

    def _build(self, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
        spec = self.spec
        if spec["kind"] == "multistep":
            milestones = spec["milestones"] or default_milestones(epochs)
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones),
                                                        gamma=spec["gamma"])
        if spec["kind"] == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=spec["factor"], patience=spec["patience"],
                min_lr=spec["min_lr"])
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)

    def step(self, monitored: Mapping[str, float]) -> None:
        """Advance one epoch (the plateau kind reads its monitored value)."""
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            key = self.spec.get("monitor", TOTAL_KEY)
            if key not in monitored:
                msg = (f"the plateau schedule monitors {key!r}, which is not a loss term; "
                       f"available: {sorted(monitored)}.")
                raise KeyError(msg)
            self.scheduler.step(monitored[key])
        else:
            self.scheduler.step()

    def scale_base_lrs(self, factor: float) -> None:
        """Scale the rates a schedule recomputes from (after a rollback)."""
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        state = None
        if self.scheduler is not None:
            state = {k: (dict(v) if isinstance(v, Counter) else v)
                     for k, v in self.scheduler.state_dict().items() if not callable(v)}
        elif self.pending is not None:
            state = self.pending
        return {"spec": dict(self.spec), "state": state}

    def load_state_dict(self, saved: Mapping[str, Any],
                        optimizer: torch.optim.Optimizer | None) -> None:
        """Restore the spec and the scheduler state (applied when the scheduler exists)."""
        custom_instance = self.scheduler if self.custom else None
        self.spec = dict(saved["spec"])
        state = saved["state"]
        if state is not None and "milestones" in state:
            state = {**state, "milestones": Counter(state["milestones"])}
        self.scheduler, self.pending = None, state
        if self.custom and custom_instance is not None and optimizer is not None:
            self.set_custom(custom_instance, optimizer)
        elif not self.custom and state is not None and optimizer is not None:
            self.ensure(optimizer, 1)


def _constant(_: int) -> float:
    return 1.0
