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


#: Entries every Trainer checkpoint holds, whatever else its layout stores.
REQUIRED_KEYS = ("model", "counters")
# torch.save writes a zip archive; very old files (and protocol-2 pickles) start with 0x80
_MAGICS = (b"PK\x03\x04", b"\x80")
# pickle instructions that import or call something: what makes unpickling run code
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def _pickle_calls_code(path: str) -> bool:
    """Whether a plain pickle file imports or calls anything (read, never executed)."""
    import pickletools

    found = False
    with open(path, "rb") as handle:
        try:
            for opcode, _, _ in pickletools.genops(handle):
                if opcode.name in _CODE_OPCODES:
                    found = True
                    break
        except Exception:  # noqa: BLE001 - a corrupt stream: report what was seen
            pass
    return found


def _load_tensors(path: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` with one ``ValueError`` per kind of bad file."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith(_MAGICS):
        msg = (f"{path!r} is not a checkpoint: it is not a file written by torch.save "
               f"(it starts with {head!r}).")
        raise ValueError(msg)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or (head.startswith(b"\x80")
                                                and _pickle_calls_code(path)):
            msg = (f"refusing to load {path!r}: it holds objects other than tensors and plain "
                   "containers, which could run code when unpickled.")
            raise ValueError(msg) from err
        msg = f"{path!r} is not a readable checkpoint: the file is corrupt or truncated."
        raise ValueError(msg) from err
    except Exception as err:  # torch reports corrupt archives as several error types
        msg = (f"{path!r} is not a readable checkpoint: the file is corrupt or truncated "
               f"({type(err).__name__}: {err}).")
        raise ValueError(msg) from err


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by a :class:`Trainer`, without running code.

    Only tensors and plain containers are accepted (``torch.load(weights_only=True)``).

    Parameters
    ----------
    path
        A file written by :meth:`Trainer.save_checkpoint`.
    map_location
        Where to put the tensors.

    Returns
    -------
    The checkpoint's contents (``"model"``, ``"counters"``, ``"metadata"``, ...).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file is not a checkpoint (another file type, corrupt or truncated, a
        pickle of arbitrary objects, or a dict without the checkpoint's entries).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        msg = f"checkpoint {path!r} {what}."
        raise FileNotFoundError(msg)
    payload = _load_tensors(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        kind = type(payload).__name__
        msg = (f"{path!r} is not a checkpoint written by this version of step (it holds a "
               f"{kind} without the checkpoint format marker; a model's state_dict or a file "
               "from another program cannot be resumed).")
        raise ValueError(msg)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        msg = f"{path!r} is an incomplete checkpoint: it lacks {missing}."
        raise ValueError(msg)
    return payload
