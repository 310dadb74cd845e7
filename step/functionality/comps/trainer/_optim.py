"""Optimizer parameter groups for the two training stages, and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Submodules trained at ``tune_lr`` in stage 2 (the pretrained expression backbone).
BACKBONE_MODULES = ("moduler", "cls_token", "expand", "transformer", "readout", "decoder")
#: Submodules that carry the batch correction.
BATCH_MODULES = ("batch_embedding", "batch_readout")
#: Submodules that stay at ``lr`` in stage 2 (new heads).
HEAD_MODULES = ("smoother", "anchors", "classifier")


def _params_of(model: nn.Module, name: str) -> list[nn.Parameter]:
    part = getattr(model, name, None)
    if part is None:
        return []
    if isinstance(part, nn.Parameter):
        return [part]
    if isinstance(part, nn.Module):
        return list(part.parameters())
    return []


def _check_lr(name: str, value: float) -> float:
    if isinstance(value, bool) or not (float(value) > 0 and math.isfinite(float(value))):
        msg = f"{name} must be a positive finite number, got {value!r}."
        raise ValueError(msg)
    return float(value)


def stage_param_groups(
    model: nn.Module,
    *,
    lr: float,
    tune_lr: float,
    stage: int,
    tune_batch_embedding: bool = True,
) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """Build named parameter groups for ``stage`` and list the parameters to freeze.

    Stage 1 trains every parameter at ``lr`` in one group named ``"all"``. Stage 2 puts
    the heads (smoother, anchors, classifier, and any parameter that belongs to no known
    part) at ``lr``, the backbone at ``tune_lr``, and the batch embedding/readout at
    ``tune_lr`` when the model has more than one batch and ``tune_batch_embedding`` is
    true; otherwise those are frozen. Every parameter appears in exactly one group or in
    the frozen list.
    """
    lr = _check_lr("lr", lr)
    tune_lr = _check_lr("tune_lr", tune_lr)
    if stage not in (1, 2):
        msg = f"stage must be 1 or 2, got {stage!r}."
        raise ValueError(msg)
    params = list(model.parameters())
    if stage == 1:
        return [{"name": "all", "params": params, "lr": lr}], []

    seen: set[int] = set()

    def take(names: Sequence[str]) -> list[nn.Parameter]:
        out = []
        for name in names:
            for p in _params_of(model, name):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    backbone = take(BACKBONE_MODULES)
    batch = take(BATCH_MODULES)
    heads = take(HEAD_MODULES)
    other = [p for p in params if id(p) not in seen]
    n_batches = int(getattr(model, "n_batches", 1) or 1)
    tune_batch = bool(batch) and n_batches > 1 and tune_batch_embedding
    groups = [
        {"name": "head", "params": heads + other, "lr": lr},
        {"name": "backbone", "params": backbone, "lr": tune_lr},
    ]
    if tune_batch:
        groups.append({"name": "batch", "params": batch, "lr": tune_lr})
    frozen = [] if tune_batch else batch
    return [g for g in groups if g["params"]], frozen


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameter groups (``group<i>`` when unnamed)."""
    return [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]


def kl_warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear KL warm-up: ``(epoch + 1) / warmup_epochs`` capped at 1 (1 when disabled)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def default_milestones(epochs: int) -> list[int]:
    """Milestones used when none are given: half and three quarters of the run."""
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 0 < m < epochs})


def build_optimizer(model: nn.Module, frozen: Sequence[nn.Parameter], *, lr: float,
                    tune_lr: float, stage: int, tune_batch_embedding: bool,
                    weight_decay: float) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """The Adam(W) optimizer of a stage over named groups, and the parameters it freezes.

    ``frozen`` (the previous stage's frozen parameters) are made trainable again first.
    """
    if stage == 2 and getattr(model, "smoother", None) is None and getattr(
            model, "anchors", None) is None:
        msg = ("stage 2 fine-tunes a pretrained backbone under new heads, but the model has "
               "neither a smoother nor anchors; call model.init_smoother_with_builtin() or "
               "model.init_anchors(n_classes) first.")
        raise ValueError(msg)
    for p in frozen:
        p.requires_grad_(True)
    groups, now_frozen = stage_param_groups(model, lr=lr, tune_lr=tune_lr, stage=stage,
                                            tune_batch_embedding=tune_batch_embedding)
    for p in now_frozen:
        p.requires_grad_(False)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        msg = "the model has no trainable parameters."
        raise ValueError(msg)
    cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    # one fused kernel for all parameters: much faster than the per-parameter loop for
    # the many small tensors of a transformer
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for g in groups for p in g["params"])
    return cls(groups, lr=lr, weight_decay=weight_decay, fused=fused), list(now_frozen)
