"""The training history (one row per epoch, plus mid-epoch validations) and its loggers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pandas as pd


def _table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = list(dict.fromkeys(k for r in rows for k in r))  # first-seen order
    return {"columns": columns, "rows": [[r.get(c) for c in columns] for r in rows]}


def _rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{c: v for c, v in zip(table["columns"], row) if v is not None}
            for row in table["rows"]]


class History:
    """Epoch rows and step-level validation records, saved with every checkpoint."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.steps: list[dict[str, float]] = []

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {**_table(self.rows), "steps": _table(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = _rows(state)
        self.steps = _rows(state["steps"]) if "steps" in state else []


class TensorBoardLogger:
    """Log every numeric history column as a scalar (a ``SummaryWriter`` or a folder)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        if isinstance(self.writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                msg = "TensorBoard logging needs the tensorboard package: pip install tensorboard"
                raise ImportError(msg) from err
            self.writer = SummaryWriter(os.fspath(self.writer))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
