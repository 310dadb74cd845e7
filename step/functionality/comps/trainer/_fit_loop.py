"""The fit loop: epochs, validation, early stopping, schedule, checkpoints and interrupts.

It drives any :class:`~step.functionality.comps.trainer.sources.BatchSource` through the
trainer's parts (the training step, the evaluation loop, the stoppers, the schedule, the
history), using only their public members.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from . import _checkpoint as ckpt
from . import _distributed as ddp
from ._callbacks import call_hook
from ._evaluation import epoch_means
from ._guard import NonFiniteError
from ._optim import group_names
from ._running import RunningMeans
from ._signals import sigterm_as_interrupt
from ._stoppers import monitored_values
from .sources import BatchSource, Shard


class NullDisplay:
    """The display used when none is given: it shows nothing."""

    def __enter__(self) -> NullDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start_steps(self, total: int | None) -> None: ...

    def advance_steps(self, n: int = 1) -> None: ...

    def end_epoch(self, train: Mapping, val: Mapping | None, best: Mapping) -> None: ...


def _weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class FitLoop:
    """Run the epochs of one loop call and hold the state that makes it resumable."""

    def __init__(self, trainer: Any, epoch_seed_base: int) -> None:
        self.trainer = trainer
        self.epoch = 0
        self.epoch_seed_base = int(epoch_seed_base)
        self.name: str | None = None
        self.loop_epoch = 0
        self.epochs = 0
        self.finished = False
        self.stopped = False
        self.stop_reason: str | None = None
        self.stop_request: str | None = None
        self.best: dict[str, Any] = {"value": math.inf, "epoch": None, "state": None}
        self.source: BatchSource | None = None
        self.pending: dict[str, Any] | None = None
        self.boundary: dict[str, Any] | None = None

    def shard(self) -> Shard:
        """This process's place among the data-parallel processes."""
        t = self.trainer
        return Shard(ddp.rank(), ddp.world_size()) if t.distributed else Shard()

    def epoch_seed(self, epoch: int) -> int:
        return (self.epoch_seed_base + 1_000_003 * (epoch + 1)) % (2**31 - 1)

    # -- one call -------------------------------------------------------------------
    def run(self, source: BatchSource, epochs: int, display: Any = None) -> bool:
        """Train ``epochs`` epochs of ``source`` (continuing a resumed call); return
        whether training stopped before its last epoch."""
        t = self.trainer
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            msg = f"epochs must be a positive integer, got {epochs!r}."
            raise ValueError(msg)
        if t.optimizer is None:
            msg = "call init_optimizer() before training."
            raise RuntimeError(msg)
        pending, self.pending = self.pending, None
        resumed = pending is not None and pending["name"] == source.name
        if resumed and pending["finished"] and (pending["stopped"] or epochs <= pending["loop_epoch"]):
            return self._already_finished(pending)
        start = pending["loop_epoch"] if resumed else 0
        if resumed:
            source.load_state_dict(pending["source"])
        else:
            t.stoppers.reset()
            t.schedule.reset()
            self.best = {"value": math.inf, "epoch": None, "state": None}
        self.name, self.epochs, self.loop_epoch, self.source = source.name, epochs, start, source
        self.finished = self.stopped = False
        self.stop_reason = self.stop_request = None
        source.bind(t.plan, self.shard())
        if t.distributed:
            ddp.broadcast_model(t.model)
            self.epoch_seed_base = ddp.broadcast_int(self.epoch_seed_base)
        t.schedule.ensure(t.optimizer, epochs)
        t.step.check_terms = self.check_terms
        t.model.train()
        self._snapshot(finite=True)
        call_hook(t.callbacks, "on_train_start", trainer=t, loop=source.name, epochs=epochs,
                  resumed=resumed)
        display = display(start) if callable(display) else (display or NullDisplay())
        stopped, failure = False, None
        try:
            with display, sigterm_as_interrupt():
                for loop_epoch in range(start, epochs):
                    stopped = self._epoch(source, loop_epoch, display)
                    if stopped:
                        break
        except NonFiniteError as err:
            stopped, failure, self.stopped = True, err, True
            self.stop_reason = str(err)
            if t.guard.good_state is not None:
                t.model.load_state_dict(t.guard.good_state["model"])
        except KeyboardInterrupt as err:
            self._on_interrupt(str(err) or "keyboard interrupt")
            self._finish(stopped, interrupted=True)
            raise
        except OSError as err:  # e.g. a data file damaged while reading: keep the last epoch
            self._on_interrupt(f"{type(err).__name__}: {err}")
            self._finish(stopped, interrupted=True)
            raise
        self._finish(stopped)
        if failure is not None:
            raise failure
        return stopped

    def _already_finished(self, pending: Mapping[str, Any]) -> bool:
        reason = pending["stop_reason"] or f"it completed its {pending['loop_epoch']} epochs"
        self.name, self.loop_epoch, self.epochs = pending["name"], pending["loop_epoch"], pending["epochs"]
        self.finished, self.stopped, self.stop_reason = True, pending["stopped"], pending["stop_reason"]
        self._restore_best()
        self.trainer.say(f"{self.name} had already finished ({reason}); nothing to do.")
        return bool(pending["stopped"])

    def check_terms(self, loss_dict: Mapping[str, Any]) -> None:
        """Before the first update of a loop: every configured term must exist."""
        t = self.trainer
        terms = t.plan.terms(loss_dict)
        t.stoppers.validate(terms)
        unknown = sorted(set(t.plan.loss_weights) - terms)
        if unknown:
            msg = (f"loss_weights names {unknown}, which the model does not return; its "
                   f"terms are {sorted(terms)}.")
            raise KeyError(msg)

    # -- one epoch ------------------------------------------------------------------
    def _epoch(self, source: BatchSource, loop_epoch: int, display: Any) -> bool:
        t = self.trainer
        self.loop_epoch = loop_epoch
        t.plan.loop_epoch = loop_epoch
        t.step.epoch = self.epoch
        t.model.train()
        if t.distributed:
            ddp.sync_rng()
        call_hook(t.callbacks, "on_train_epoch_start", trainer=t, epoch=self.epoch)
        started = time.perf_counter()
        source.set_epoch(self.epoch, self.epoch_seed(self.epoch))
        display.start_steps(source.n_steps())
        means = RunningMeans()
        for batch in source.batches():
            loss_dict = None if batch.compute is None else batch.compute()
            t.step(loss_dict, batch.n_obs, means)
            display.advance_steps()
            call_hook(t.callbacks, "on_train_batch_end", trainer=t, step=t.global_step,
                      loss_dict=loss_dict, batch=batch)
            if source.valid_every and t.global_step % source.valid_every == 0:
                t.records.steps.append({"step": t.global_step, **self._validate(source)})
        train = epoch_means(means)
        if not train:
            msg = f"{source.name} ran no training step in epoch {self.epoch}: empty loader?"
            raise ValueError(msg)
        valid = self._validate(source)
        return self._end_epoch(train, valid, started, display)

    def _validate(self, source: BatchSource) -> dict[str, float] | None:
        batches = source.validation_batches()
        return None if batches is None else self.trainer.evaluator.run(batches)

    def _end_epoch(self, train: dict[str, float], valid: dict[str, float] | None,
                   started: float, display: Any) -> bool:
        t = self.trainer
        values = {**train, **(valid or {})}
        if valid:
            call_hook(t.callbacks, "on_validation_end", trainer=t, logs=dict(valid))
        row: dict[str, Any] = {"epoch": self.epoch, "loop": self.name, "stage": t.stage}
        for name, group in zip(group_names(t.optimizer), t.optimizer.param_groups):
            row[f"lr_{name}"] = group["lr"]
        kl = t.plan.kl_weight()
        if kl is not None:
            row["kl_weight"] = kl
        row.update(values)
        stop, best, reason = t.stoppers.step(values, self.epoch)
        row["best"] = bool(best)
        if best:
            self.best = {"value": t.stoppers.best_score, "epoch": self.epoch,
                         "state": _weights(t.model)}
        row["seconds"] = time.perf_counter() - started
        call_hook(t.callbacks, "on_train_epoch_end", trainer=t, epoch=self.epoch, logs=row)
        requested = self.stop_request is not None
        if t.distributed:
            requested = ddp.any_rank(requested)
        if stop:
            self.stop_reason = reason
        elif requested:
            stop = True
            why = self.stop_request or "another process asked to stop"
            self.stop_reason = f"stopped after epoch {self.epoch}: {why}"
        t.records.rows.append(row)
        if t.is_main_process:
            t.logger.log(row)
        t.schedule.step(monitored_values(values))
        self.epoch += 1
        self.loop_epoch += 1
        self.stopped = stop
        self.finished = stop or self.loop_epoch == self.epochs
        every = t.checkpoint_every
        if t.checkpoint_path is not None and every and self.epoch % int(every) == 0:
            t.save_checkpoint(t.checkpoint_path)
        self._snapshot(finite=all(math.isfinite(v) for v in train.values()))
        display.end_epoch(train, valid, t.stoppers.best_values())
        return stop

    # -- boundaries -----------------------------------------------------------------
    def _snapshot(self, *, finite: bool) -> None:
        """Keep the state at this epoch boundary: for an interrupt (saved instead of the
        mid-epoch state, so a resumed run continues exactly) and for rollbacks."""
        t = self.trainer
        want_ckpt = t.checkpoint_path is not None and t.is_main_process
        want_good = t.guard.wants_snapshots and finite and t.model_is_finite()
        if want_ckpt:
            state = t.state_dict()
            best = state.pop("best")  # replaced when it changes, never updated in place
            self.boundary = {**ckpt.detached_copy(state), "best": dict(best)}
            if want_good:
                t.guard.good_state = {"model": self.boundary["model"],
                                      "optimizer": self.boundary["optimizer"]}
        elif want_good:
            t.guard.good_state = ckpt.detached_copy(
                {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()})

    def _on_interrupt(self, reason: str) -> None:
        """Save the state of the last completed epoch (rank 0) and say where."""
        t = self.trainer
        self.stop_reason = f"interrupted during epoch {self.epoch + 1} ({reason})"
        state, self.boundary = self.boundary, None
        if t.checkpoint_path is not None and state is not None:
            ckpt.write_checkpoint(state, t.checkpoint_path)
            done = state["counters"]["epoch"]
            self.stop_reason += (f"; the state after {done} completed epochs was saved to "
                                 f"{os.fspath(t.checkpoint_path)}")

    def _restore_best(self) -> int | None:
        t = self.trainer
        if t.restore_best and self.best["state"] is not None and self.best["epoch"] != self.epoch - 1:
            t.model.load_state_dict(self.best["state"])
            return self.best["epoch"]
        return None

    def _finish(self, stopped: bool, *, interrupted: bool = False) -> None:
        t = self.trainer
        restored = self._restore_best()
        call_hook(t.callbacks, "on_train_end", trainer=t, stopped=stopped)
        if self.stop_reason:
            t.say(self.stop_reason)
        if restored is not None:
            t.say(f"restored the weights of epoch {restored} "
                  f"(best {t.stoppers.monitor} = {self.best['value']:.5g}).")
        self.source = None
        self.boundary = None
        if not interrupted:
            self.finished = True
            if t.checkpoint_path is not None:
                t.save_checkpoint(t.checkpoint_path)

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        source = self.source.state_dict() if self.source is not None else (
            (self.pending or {}).get("source", {}))
        return {"name": self.name or "", "loop_epoch": self.loop_epoch, "epochs": self.epochs,
                "finished": self.finished, "stopped": self.stopped,
                "stop_reason": self.stop_reason or "", "source": source, "epoch": self.epoch,
                "epoch_seed_base": self.epoch_seed_base}

    def load_state_dict(self, state: Mapping[str, Any], best: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.epoch_seed_base = int(state["epoch_seed_base"])
        self.name = state["name"] or None
        self.loop_epoch, self.epochs = int(state["loop_epoch"]), int(state["epochs"])
        self.finished, self.stopped = bool(state["finished"]), bool(state["stopped"])
        self.stop_reason = state["stop_reason"] or None
        self.pending = {**state, "name": self.name} if self.name else None
        self.best = {"value": float(best["value"]),
                     "epoch": None if int(best["epoch"]) < 0 else int(best["epoch"]),
                     "state": best["state"]}
