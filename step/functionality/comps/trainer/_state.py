"""Assemble a Trainer's checkpoint from the state of its parts, and restore it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import _checkpoint as ckpt


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and plain containers."""
    import step

    t = trainer
    best = t.fit_loop.best
    return {
        "version": step.__version__,
        "metadata": dict(t.metadata),
        "model": t.model.state_dict(),
        "model_config": dict(getattr(t.model, "config", {}) or {}),
        "optimizer": None if t.optimizer is None else t.optimizer.state_dict(),
        "optimizer_spec": dict(t.optimizer_spec),
        "scheduler": t.schedule.state_dict(),
        "stoppers": t.stoppers.state_dict(),
        "guard": t.guard.state_dict(),
        "step": t.step.state_dict(),
        "fit": t.fit_loop.state_dict(),
        "counters": {"epoch": t.epoch, "global_step": t.global_step, "stage": t.stage,
                     "loop_name": t.fit_loop.name or "", "loop_epoch": t.fit_loop.loop_epoch},
        "best": {"value": float(best["value"]),
                 "epoch": -1 if best["epoch"] is None else int(best["epoch"]),
                 "state": best["state"]},
        "history": t.records.state_dict(),
        "callbacks": [cb.state_dict() if callable(getattr(cb, "state_dict", None)) else None
                      for cb in t.callbacks],
        "rng": ckpt.rng_state(),
    }


def restore_trainer(trainer: Any, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
    """Load what :func:`trainer_state` returned into ``trainer``.

    The current optimizer is kept when it has the saved settings (so a custom scheduler
    bound to it stays valid); otherwise it is rebuilt from them.
    """
    t = trainer
    try:
        t.model.load_state_dict(state["model"])
    except RuntimeError as err:
        msg = f"the checkpoint's weights do not fit this model: {err}"
        raise ValueError(msg) from err
    spec = dict(state["optimizer_spec"])
    if spec:
        if t.optimizer is None or t.optimizer_spec != spec:
            t.init_optimizer(**spec)
        t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.load_state_dict(state["scheduler"], t.optimizer)
    t.stoppers.load_state_dict(state["stoppers"])
    t.guard.load_state_dict(state["guard"])
    t.step.load_state_dict(state["step"])
    t.stage = int(state["counters"]["stage"])
    t.fit_loop.load_state_dict(state["fit"], state["best"])
    t.records.load_state_dict(state["history"])
    for cb, saved in zip(t.callbacks, state.get("callbacks") or []):
        if saved is not None and callable(getattr(cb, "load_state_dict", None)):
            cb.load_state_dict(saved)
    if restore_rng:
        ckpt.set_rng_state(state["rng"])


def check_compatible(trainer: Any, state: Mapping[str, Any], path: Any) -> None:
    """Refuse a checkpoint of another step version, model configuration or metadata."""
    import step

    where = os.fspath(path)
    saved = str(state.get("version", "?"))
    if saved.split(".")[:2] != step.__version__.split(".")[:2]:
        msg = (f"checkpoint {where!r} was written by step {saved}; this is step "
               f"{step.__version__}, whose checkpoints differ. Load it with that version.")
        raise ValueError(msg)
    own = dict(getattr(trainer.model, "config", {}) or {})
    config = state.get("model_config") or {}
    if own and config and own != config:
        diff = sorted(k for k in set(own) | set(config) if own.get(k) != config.get(k))
        msg = f"checkpoint {where!r} is for a model with other settings: {diff}."
        raise ValueError(msg)
    stored = state.get("metadata") or {}
    problems = []
    for key in sorted(set(stored) & set(trainer.metadata)):
        mine = trainer.metadata[key]
        if stored[key] == mine:
            continue
        detail = ""
        if isinstance(stored[key], list) and isinstance(mine, list):
            missing = sorted(set(stored[key]) - set(mine))
            extra = sorted(set(mine) - set(stored[key]))
            if not missing and not extra:
                detail = " (the same values in another order)"
            else:
                detail = (f" (in the checkpoint only: {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}; here only: {extra[:5]}"
                          f"{' ...' if len(extra) > 5 else ''})")
        problems.append(f"its {key!r} differs from this trainer's{detail}")
    if problems:
        msg = f"checkpoint {where!r} does not fit: " + "; ".join(problems) + "."
        raise ValueError(msg)
