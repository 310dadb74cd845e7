"""Fused CPU self-attention for short sequences with narrow heads.

The kernel (``csrc/fused_attention.cpp``) is compiled for the machine at its first use
with :func:`torch.utils.cpp_extension.load` and cached by PyTorch under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``). Building needs a
C++ compiler and ``ninja``; where either is missing, or the build fails, one warning
says why and the encoder keeps its unfused attention. Setting the environment variable
``STEP_FUSED_ATTENTION=0`` turns the kernel off without trying to build it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["FUSED_HEAD_DIMS", "fused_attention_available", "fused_self_attention"]

#: Head sizes the fused kernel is compiled for. For 16-dimensional heads the unfused
#: path (batched matmuls) is as fast (``benchmarks/efficiency.py``), so they keep it.
FUSED_HEAD_DIMS = (4, 8)

_SOURCE = Path(__file__).with_name("csrc") / "fused_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
_ENV = "STEP_FUSED_ATTENTION"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "module": None}


def _cpu_signature() -> str:
    """What the ``-march=native`` build depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _build_name() -> str:
    """An extension name that changes with the source, the flags, torch and the CPU, so
    that a cache shared by several machines never hands one CPU another's build."""
    digest = hashlib.sha1()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                 _cpu_signature().encode()):
        digest.update(part)
    return f"step_fused_attention_{digest.hexdigest()[:12]}"


def _load() -> ModuleType | None:
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from torch.utils.cpp_extension import load

        _log.info("Compiling the fused CPU attention kernel (once per machine).")
        return load(_build_name(), [str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure falls back
        warnings.warn(f"The fused CPU attention kernel is not available ({type(err).__name__}: "
                      f"{str(err).strip()[:300]}); attention runs unfused, which is slower. "
                      f"Set {_ENV}=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return None


def _module() -> ModuleType | None:
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"] = _load()
                _state["tried"] = True
    return _state["module"]


def fused_attention_available() -> bool:
    """Whether the fused CPU attention kernel is built (building it at the first call).

    Returns
    -------
    bool
        False where the kernel is turned off (``STEP_FUSED_ATTENTION=0``) or could not
        be built.
    """
    return _module() is not None


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: Tensor, heads: int, scale: float) -> Tensor:
        out, log_sum_exp = _module().forward(qkv, heads, scale)
        ctx.save_for_backward(qkv, log_sum_exp)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        qkv, log_sum_exp = ctx.saved_tensors
        return _module().backward(grad, qkv, log_sum_exp, ctx.heads, ctx.scale), None, None


def fused_self_attention(qkv: Tensor, heads: int, scale: float) -> Tensor:
    """Softmax self-attention from the packed projection of an encoder layer.

    Parameters
    ----------
    qkv
        ``F.linear(x, in_proj_weight, in_proj_bias)`` of ``x`` of shape
        ``(cells, tokens, width)``: shape ``(cells, tokens, 3 * width)``, float32 or
        float64, on the CPU, with queries, keys and values side by side.
    heads
        Number of heads; ``width / heads`` must be one of :data:`FUSED_HEAD_DIMS`.
    scale
        Factor of the scores (usually ``head_dim ** -0.5``).

    Returns
    -------
    Tensor
        The heads' outputs side by side, shape ``(cells, tokens, width)``, ready for the
        output projection. Differentiable with respect to ``qkv``.

    Raises
    ------
    RuntimeError
        If the kernel is not available (check :func:`fused_attention_available`).
    """
    if _module() is None:
        msg = "the fused CPU attention kernel is not available"
        raise RuntimeError(msg)
    return _FusedAttention.apply(qkv.contiguous(), heads, scale)
