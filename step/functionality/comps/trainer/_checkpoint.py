"""Seeding, random-number-generator state capture, and safe checkpoint files."""

from __future__ import annotations

import copy
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from ._early_stopping import save_atomic

CHECKPOINT_FORMAT = 1


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA).

    With ``deterministic`` torch is also asked to use deterministic kernels.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        msg = f"seed must be an integer, got {seed!r}."
        raise TypeError(msg)
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """The state of every global generator, as plain tensors/lists (safe to load)."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def detached_copy(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor cloned to the CPU, so that later
    training steps cannot change it."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return copy.deepcopy(obj)


def write_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` atomically: a crash mid-write leaves any previous file intact."""
    save_atomic({"format": CHECKPOINT_FORMAT, **payload}, path)


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it.

    Only tensors and plain containers are accepted (``torch.load(weights_only=True)``); a
    file holding arbitrary pickled objects is refused with a ``ValueError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        msg = f"checkpoint {path!r} does not exist."
        raise FileNotFoundError(msg)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        msg = (
            f"refusing to load {path!r}: it holds objects other than tensors and plain "
            f"containers, which could run code when unpickled ({err})."
        )
        raise ValueError(msg) from err
    except (RuntimeError, EOFError) as err:
        msg = f"{path!r} is not a readable checkpoint ({err})."
        raise ValueError(msg) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path!r} is not a checkpoint written by this version of step."
        raise ValueError(msg)
    return payload
