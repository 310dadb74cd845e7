"""One optimisation step, written once and used by every loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import _distributed as ddp
from ._early_stopping import TOTAL_KEY
from ._guard import NonFiniteGuard
from ._plan import TrainingPlan
from ._running import RunningMeans


class TrainingStep:
    """Loss terms → weighted total → backward → (sync) → clip → finite check → update.

    Parameters
    ----------
    plan
        Computes totals (loss weights).
    guard
        Decides what a non-finite step leads to.
    grad_clip
        Maximum gradient norm, or None.
    check_finite
        Check the total and the gradient norm of every step (one host sync per step);
        a failing step is skipped so bad values never reach the weights.
    distributed
        Average gradients over processes before the update.
    """

    def __init__(self, plan: TrainingPlan, guard: NonFiniteGuard, *,
                 grad_clip: float | None = None, check_finite: bool = True,
                 distributed: bool = False) -> None:
        self.plan = plan
        self.guard = guard
        self.grad_clip = grad_clip
        self.check_finite = check_finite
        self.distributed = distributed
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None
        self.global_step = 0
        self.epoch = 0
        #: checks the loss terms once per loop, before the first update
        self.check_terms: Callable[[Mapping[str, Any]], None] | None = None
        self.lower_lrs: Callable[[float], bool] = lambda factor: False

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def __call__(self, loss_dict: Mapping[str, Any] | None, n_obs: int = 1,
                 means: RunningMeans | None = None) -> torch.Tensor:
        """Update the weights from one batch's loss terms; return the detached total.

        ``loss_dict`` is None for an empty turn of a process in data-parallel training.
        The terms and total are added to ``means`` weighted by ``n_obs``.
        """
        if self.optimizer is None:
            msg = "call init_optimizer() before training."
            raise RuntimeError(msg)
        total = None
        if loss_dict is not None:
            total = self.plan.total(loss_dict)
            if self.check_terms is not None:
                self.check_terms(loss_dict)
                self.check_terms = None
        self.optimizer.zero_grad(set_to_none=True)
        if total is not None:
            (total if self.scaler is None else self.scaler.scale(total)).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = self._params()
        checked = total
        if self.distributed:
            checked = ddp.sync_gradients(params, n_obs if total is not None else 0, total)
        ok = self._finite_and_clipped(params, checked)
        if ok and self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.guard.record(ok, loss_dict, epoch=self.epoch, model=self.plan.model,
                          optimizer=self.optimizer, lower_lrs=self.lower_lrs)
        self.global_step += 1
        out = torch.zeros(()) if total is None else total.detach()
        if means is not None and loss_dict is not None:
            means.add(loss_dict, n_obs)
            means.add({TOTAL_KEY: out}, n_obs)
        return out

    def _finite_and_clipped(self, params: list[nn.Parameter], total: torch.Tensor | None
                            ) -> bool:
        with_grad = [p for p in params if p.grad is not None]
        norm = None
        if self.grad_clip is not None and with_grad:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip)
        elif self.check_finite and with_grad:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if not self.check_finite:
            return True
        checks = [torch.isfinite(t) for t in (total, norm) if t is not None]
        if not checks:
            return True
        finite = checks[0] if len(checks) == 1 else checks[0] & checks[1].to(checks[0].device)
        return bool(finite)  # the one host sync per step: bad values must not land

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
