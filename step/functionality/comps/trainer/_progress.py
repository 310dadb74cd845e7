"""The epoch-loop decorator and its live rich display: rendering and dispatch only."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

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


def train_loop_formatter(make_source: Callable[..., Any]) -> Callable[..., bool]:
    """Turn a method that describes one epoch into a full epoch loop.

    The decorated method is called as ``method(trainer, epochs, *args, **kwargs)`` and
    returns a :class:`~step.functionality.comps.trainer.sources.BatchSource`: what one
    epoch iterates over and how each batch's loss is computed. The decorator shows a live
    rich display of every loss term (unless the trainer is silent or not on a terminal)
    and hands the source to :meth:`Trainer.fit`, which runs up to ``epochs`` epochs
    (continuing a resumed run where it stopped) with validation, early stopping, the
    schedule, callbacks, checkpoints and interrupt handling. The loop returns True when
    training stopped early. ``help()`` shows the method's own signature.
    """

    @functools.wraps(make_source)
    def loop(trainer: Any, epochs: int, *args: Any, **kwargs: Any) -> bool:
        source = make_source(trainer, epochs, *args, **kwargs)
        if source.name == "custom":
            source.name = make_source.__name__

        def display(start: int) -> LossDisplay:
            return LossDisplay(source.name, epochs, start=start,
                               enabled=trainer.display_enabled())

        return trainer.fit(source, epochs, display=display)

    loop.__signature__ = inspect.signature(make_source).replace(return_annotation="bool")
    return loop
