"""Choosing the device and the autocast precision."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or a :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'."
        raise ValueError(msg)
    return dev


def check_amp(amp: str | None, device: torch.device) -> str | None:
    """Validate the autocast setting: None, ``"auto"``, ``"bf16"`` or ``"fp16"``."""
    if amp in (None, False, "none"):
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return None
    if amp not in ("bf16", "fp16"):
        msg = f"amp must be None, 'auto', 'bf16' or 'fp16', got {amp!r}."
        raise ValueError(msg)
    if amp == "fp16" and device.type != "cuda":
        msg = "amp='fp16' needs a CUDA device; use amp='bf16' on the CPU."
        raise ValueError(msg)
    return amp
