"""Files of a saved workflow: atomic writes, the config record and the gene check."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from step.utils.files import write_atomic

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "HISTORY_FILE",
    "MODEL_FILE",
    "check_genes",
    "read_config",
    "read_state_dict",
    "write_config",
    "write_history",
    "write_state_dict",
]

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
#: Version of the layout of a saved run directory.
FORMAT_VERSION = 1
_CONFIG_KEYS = ("model", "genes", "settings", "categories")


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a model's ``state_dict`` (tensors only, loadable with ``weights_only=True``)."""
    tensors = {k: v.detach().to("cpu") for k, v in state.items()}
    return write_atomic(path, lambda handle: torch.save(tensors, handle))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict written by :func:`write_state_dict` without running pickled code."""
    path = Path(path)
    if not path.is_file():
        msg = f"no model weights at {os.fspath(path)!r}; expected a file written by save()."
        raise FileNotFoundError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in several types
        msg = f"{os.fspath(path)!r} is not a readable tensor file: {err}"
        raise ValueError(msg) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        msg = f"{os.fspath(path)!r} does not hold a state dict of tensors."
        raise ValueError(msg)
    return state


def write_config(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a JSON record (sorted keys, indented) atomically."""
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n"
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    msg = f"cannot write a value of type {type(value).__name__} to JSON."
    raise TypeError(msg)


def read_config(path: str | os.PathLike, *, workflow: str) -> dict[str, Any]:
    """Read a saved config and check that it belongs to ``workflow``."""
    path = Path(path)
    if not path.is_file():
        msg = f"no {CONFIG_FILE} in {os.fspath(path.parent)!r}; is this a folder written by save()?"
        raise FileNotFoundError(msg)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{os.fspath(path)!r} is not a readable {CONFIG_FILE} (corrupt JSON: {err})."
        raise ValueError(msg) from err
    if not isinstance(config, dict):
        msg = f"{os.fspath(path)!r} does not hold a JSON object; it was not written by save()."
        raise ValueError(msg)
    if config.get("workflow") != workflow:
        msg = (f"{os.fspath(path)!r} was saved by {config.get('workflow')!r}, not {workflow!r}; "
               f"load it with that class.")
        raise ValueError(msg)
    if config.get("format") != FORMAT_VERSION:
        msg = (f"{os.fspath(path)!r} has layout version {config.get('format')!r}; this version "
               f"of step reads version {FORMAT_VERSION}.")
        raise ValueError(msg)
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        msg = f"{os.fspath(path)!r} is incomplete: it lacks {missing}."
        raise ValueError(msg)
    genes = [str(g) for g in config["genes"]]
    if len(set(genes)) != len(genes):
        msg = (f"{os.fspath(path)!r} lists duplicated gene names; a model saved from data with "
               "duplicated var_names cannot be matched to data by gene name.")
        raise ValueError(msg)
    return config


def write_history(history: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the training history as CSV atomically."""
    text = history.to_csv(index=False)
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def check_genes(var_names: Iterable[str], genes: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming the model genes that ``var_names`` lacks.

    Parameters
    ----------
    var_names
        Gene names of the data to use with a saved model.
    genes
        Genes the model was trained on.
    """
    have = {str(g) for g in var_names}
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in have]
    if missing:
        shown = ", ".join(repr(g) for g in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        msg = (
            f"the data lack {len(missing)} of the {len(genes)} genes the model was trained on: "
            f"{shown}{more}. Pass an AnnData whose var_names include every model gene "
            "(extra genes are ignored)."
        )
        raise ValueError(msg)
