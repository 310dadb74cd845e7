"""The epoch-loop decorator and its live rich display. Display code never optimises."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from ._trainer import Trainer


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


class LossDisplay:
    """A progress bar over epochs (and steps) plus a table of every loss term.

    Does nothing when ``enabled`` is false, so loops never need to check.
    """

    def __init__(
        self, description: str, epochs: int, *, start: int = 0, enabled: bool = True,
        console: Console | None = None,
    ) -> None:
        self.enabled = enabled
        self.rows: dict[str, tuple[float | None, float | None, float | None]] = {}
        if not enabled:
            return
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.epoch_task = self.progress.add_task(description, total=epochs, completed=start)
        self.step_task = None
        self.live = Live(self._render(), console=self.console, refresh_per_second=4,
                         transient=False)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, show_edge=False)
        for col in ("term", "train", "val", "best"):
            table.add_column(col, justify="right" if col != "term" else "left")
        for term, (train, val, best) in self.rows.items():
            table.add_row(term, _fmt(train), _fmt(val), _fmt(best))
        return Group(self.progress, table)

    def __enter__(self) -> LossDisplay:
        if self.enabled:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def start_steps(self, total: int | None, description: str = "steps") -> None:
        """Show a second bar over the steps of the current epoch."""
        if not self.enabled:
            return
        if self.step_task is None:
            self.step_task = self.progress.add_task(description, total=total)
        else:
            self.progress.reset(self.step_task, total=total)

    def advance_steps(self, n: int = 1) -> None:
        if self.enabled and self.step_task is not None:
            self.progress.advance(self.step_task, n)

    def end_epoch(
        self,
        train: Mapping[str, float],
        val: Mapping[str, float] | None,
        best: Mapping[str, float],
    ) -> None:
        """Refresh the table with this epoch's means and advance the epoch bar."""
        for term, value in train.items():
            v = None if val is None else val.get(f"val_{term}")
            self.rows[term] = (value, v, best.get(term))
        if self.enabled:
            self.progress.advance(self.epoch_task)
            self.live.update(self._render())


class TrainingInterrupted(KeyboardInterrupt):
    """Raised inside a training loop when the process receives SIGTERM."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`TrainingInterrupted` while a loop runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise TrainingInterrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_loop_formatter(train_func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a one-epoch training method into an epoch loop.

    The decorated method has the signature ``func(trainer, state, *args, **kwargs)`` and
    returns ``(train_means, valid_means)`` for one epoch (``valid_means`` may be None). The
    result is called as ``func(trainer, epochs, *args, **kwargs)``: it runs up to ``epochs``
    epochs (continuing a resumed run where it stopped), keeps the history, early stopping,
    schedule, callbacks and optional TensorBoard writer up to date, shows a live rich
    display of every term unless the trainer is silent, and prints why it stopped after the
    display closes. It returns True when training stopped early (also when non-finite
    losses persisted). On Ctrl-C or SIGTERM the trainer's state is saved to its
    ``checkpoint_path`` (when set) before the interruption propagates.
    """

    @functools.wraps(train_func)
    def loop(trainer: Trainer, epochs: int, *args: Any, **kwargs: Any) -> bool:
        from ._trainer import NonFiniteError

        start = trainer._begin_loop(train_func.__name__, epochs)
        display = LossDisplay(
            train_func.__name__, epochs, start=start, enabled=trainer._display_enabled()
        )
        stopped = False
        failure: Exception | None = None
        try:
            with display, _sigterm_as_interrupt():
                for loop_epoch in range(start, epochs):
                    state = trainer._begin_epoch(loop_epoch, epochs, display)
                    train_means, valid_means = train_func(trainer, state, *args, **kwargs)
                    stopped = trainer._end_epoch(state, train_means, valid_means)
                    display.end_epoch(
                        trainer._last_train, trainer._last_valid, trainer._best_values()
                    )
                    if stopped:
                        break
        except NonFiniteError as err:
            stopped = True
            trainer.stop_reason = str(err)
            failure = err
        except KeyboardInterrupt as err:
            trainer._on_interrupt(str(err) or "keyboard interrupt")
            raise
        finally:
            trainer._end_loop(stopped)
        if failure is not None:
            raise failure
        return stopped

    loop.__wrapped_epoch__ = train_func  # the one-epoch function, for introspection
    return loop
