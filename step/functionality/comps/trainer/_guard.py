"""The non-finite guard: skip bad steps, roll back with lower learning rates, or fail."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """Training diverged: non-finite losses persisted and could not be recovered.

    Raised out of a training loop after the model was given back its last finite
    (best) weights; the message names the terms that went bad and the epoch.
    """


class NonFiniteGuard:
    """Count non-finite steps and act when ``max_bad_steps`` come in a row.

    With ``on_nonfinite="rollback"`` the model and optimizer return to the last good
    state (the end of the last epoch whose means were finite) and every learning rate is
    halved, at most ``max_rollbacks`` times; after that, with ``"stop"``, or when there
    is no good state or the rates cannot be lowered, :class:`NonFiniteError` is raised.
    """

    def __init__(self, *, max_bad_steps: int = 20, on_nonfinite: str = "rollback",
                 max_rollbacks: int = 3, say: Callable[[str], Any] = print) -> None:
        if on_nonfinite not in ("rollback", "stop"):
            msg = f"on_nonfinite must be 'rollback' or 'stop', got {on_nonfinite!r}."
            raise ValueError(msg)
        if int(max_bad_steps) < 1 or int(max_rollbacks) < 0:
            msg = (f"need max_bad_steps >= 1 and max_rollbacks >= 0; got {max_bad_steps!r} "
                   f"and {max_rollbacks!r}.")
            raise ValueError(msg)
        self.max_bad_steps = int(max_bad_steps)
        self.on_nonfinite = on_nonfinite
        self.max_rollbacks = int(max_rollbacks)
        self.say = say
        self.n_skipped = 0
        self.n_rollbacks = 0
        self.streak = 0
        #: weights and optimizer state to roll back to (kept by the fit loop)
        self.good_state: Mapping[str, Any] | None = None

    @property
    def wants_snapshots(self) -> bool:
        return self.on_nonfinite == "rollback"

    def record(self, ok: bool, loss_dict: Mapping[str, Any] | None, *, epoch: int,
               model: nn.Module, optimizer: torch.optim.Optimizer,
               lower_lrs: Callable[[float], bool]) -> None:
        """Note one step; act on a streak of bad ones.

        ``lower_lrs(factor)`` scales every learning rate (and the schedule's base rates)
        and returns whether they really decreased.
        """
        if ok:
            self.streak = 0
            return
        self.n_skipped += 1
        self.streak += 1
        if self.streak < self.max_bad_steps:
            return
        bad = sorted(k for k, v in (loss_dict or {}).items()
                     if torch.is_tensor(v) and not bool(torch.isfinite(v).all()))
        what = f"loss terms {bad}" if bad else "the gradients"
        streak, self.streak = self.streak, 0
        can_roll = (self.on_nonfinite == "rollback" and self.good_state is not None
                    and self.n_rollbacks < self.max_rollbacks)
        if can_roll:
            model.load_state_dict(self.good_state["model"])
            optimizer.load_state_dict(self.good_state["optimizer"])
            if lower_lrs(0.5):
                self.n_rollbacks += 1
                self.say(f"{streak} consecutive non-finite steps in {what} during epoch "
                         f"{epoch + 1}: "
                         "rolled back to the last good state and halved the learning rates "
                         f"(rollback {self.n_rollbacks}/{self.max_rollbacks}).")
                return
            why = "the learning rates cannot be lowered any further"
        elif self.on_nonfinite == "rollback" and self.good_state is None:
            why = "there is no finite state to roll back to"
        elif self.on_nonfinite == "rollback":
            why = f"all {self.max_rollbacks} rollbacks were used"
        else:
            why = "on_nonfinite='stop'"
        msg = (f"training diverged during epoch {epoch + 1}: {streak} consecutive steps had "
               f"non-finite values in {what}, and {why}. Lower the learning rate, set grad_clip, or "
               "check the input counts.")
        raise NonFiniteError(msg)

    def state_dict(self) -> dict[str, int]:
        return {"n_skipped": self.n_skipped, "n_rollbacks": self.n_rollbacks,
                "streak": self.streak}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.n_skipped = int(state["n_skipped"])
        self.n_rollbacks = int(state["n_rollbacks"])
        self.streak = int(state["streak"])
