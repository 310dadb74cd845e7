"""Choosing the device and the training precision."""

from __future__ import annotations

import functools

import torch

#: the precisions a Trainer accepts
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: the CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_AMP_ALIASES = {None: "fp32", False: "fp32", "none": "fp32", "fp32": "fp32",
                "auto": "auto", "bf16": "bf16", "fp16": "fp16"}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or a :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'."
        raise ValueError(msg)
    return dev


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 autocast is worth using).

    On the CPU: the ``/proc/cpuinfo`` flags hold ``amx_bf16`` or ``avx512_bf16``, or
    ``torch.backends.cpu.get_cpu_capability()`` reports AMX (``"AVX512_AMX..."``,
    ``"AMX..."``); AVX2 or plain AVX512 alone do not count, since they emulate bf16 by
    conversion to float32. On CUDA: the device's compute capability is 8.0 (Ampere) or
    newer. False on any other device type.

    Parameters
    ----------
    device
        The training device.

    Returns
    -------
    bool
        True where bf16 is native.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
    if device.type == "cpu":
        if any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
            return True
        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    return False


def resolve_precision(precision: str | None, amp: str | bool | None,
                      device: torch.device) -> str:
    """The precision to train in: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``precision`` is one of :data:`PRECISIONS` (None: not given); ``amp`` is the older
    spelling (None, ``"auto"``, ``"bf16"``, ``"fp16"``). Both may be given if they agree.
    ``"auto"`` is bf16 where :func:`native_bf16` holds and fp32 elsewhere.
    """
    if amp not in _AMP_ALIASES:
        msg = f"amp must be None, 'auto', 'bf16' or 'fp16', got {amp!r}."
        raise ValueError(msg)
    if precision is not None and precision not in PRECISIONS:
        msg = f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}."
        raise ValueError(msg)
    from_amp = _AMP_ALIASES[amp]
    if precision is not None and amp is not None and precision != from_amp:
        msg = (f"precision={precision!r} and amp={amp!r} disagree; give only precision "
               "(amp is its older spelling).")
        raise ValueError(msg)
    wanted = precision if precision is not None else from_amp
    if wanted == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if wanted == "fp16" and device.type != "cuda":
        msg = "precision 'fp16' (amp='fp16') needs a CUDA device; use 'bf16' on the CPU."
        raise ValueError(msg)
    return wanted
