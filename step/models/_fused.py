"""Fused CPU kernels of TranscriptFormer: narrow-head self-attention, bias + GELU, dropout
(alone or with the residual addition of an encoder layer), LayerNorm (with its result in
bfloat16 under autocast) and the (zero-inflated) negative binomial log-likelihood.

The kernels (``csrc/fused_cpu.cpp``) are compiled for the machine at their first use
with :func:`torch.utils.cpp_extension.load` and cached by PyTorch under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``). Building needs a
C++ compiler and ``ninja``; where either is missing, or the build fails, one warning
says why and the model keeps its unfused operations. Setting the environment variable
``STEP_FUSED_KERNELS=0`` turns the kernels off without trying to build them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "FUSED_ATTENTION_DTYPES",
    "FUSED_DROPOUT_DTYPES",
    "FUSED_DTYPES",
    "FUSED_HEAD_DIMS",
    "fused_bias_gelu",
    "fused_count_log_prob",
    "fused_dropout",
    "fused_kernels_available",
    "fused_kernel_threads",
    "fused_kernels_off",
    "fused_layer_norm",
    "fused_residual_dropout",
    "fused_self_attention",
]

#: Head sizes the fused kernel is compiled for. For 16-dimensional heads the unfused
#: path (batched matmuls) is as fast (``benchmarks/efficiency.py``), so they keep it.
FUSED_HEAD_DIMS = (4, 8)

#: Dtypes the kernels are compiled for (full precision; float64 serves gradient checks).
FUSED_DTYPES = (torch.float32, torch.float64)

#: Dtypes the attention kernel takes: also bfloat16 (the projections under autocast),
#: which it reads and writes as such but computes in float32.
FUSED_ATTENTION_DTYPES = (*FUSED_DTYPES, torch.bfloat16)

#: Dtypes the dropout kernels take (bfloat16 computed in float32, like attention).
FUSED_DROPOUT_DTYPES = FUSED_ATTENTION_DTYPES

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
# Without OpenMP, at::parallel_for runs the kernels on one thread whatever
# torch.set_num_threads says; with it, they share torch's OpenMP runtime (the library
# of the same name that torch has already loaded) and its threads.
_OPENMP_FLAGS = ["-fopenmp"]
_ENV = "STEP_FUSED_KERNELS"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "module": None, "off": 0}


def _cpu_signature() -> str:
    """What the ``-march=native`` build depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _build_flags(openmp: bool = True) -> tuple[list[str], list[str]]:
    """Compiler and linker flags; with ``openmp``, OpenMP where torch itself is built
    with it, on Linux."""
    if openmp and sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return [*_FLAGS, *_OPENMP_FLAGS], list(_OPENMP_FLAGS)
    return list(_FLAGS), []


def _build_name(openmp: bool = True) -> str:
    """An extension name that changes with the source, the flags, torch and the CPU, so
    that a cache shared by several machines never hands one CPU another's build."""
    digest = hashlib.sha1()
    cflags, ldflags = _build_flags(openmp)
    for part in (_SOURCE.read_bytes(), " ".join(cflags + ldflags).encode(),
                 torch.__version__.encode(), _cpu_signature().encode()):
        digest.update(part)
    return f"step_fused_cpu_{digest.hexdigest()[:12]}"


def _shares_torch_threads(module: Any) -> bool:
    """Whether an OpenMP build follows ``torch.set_num_threads``: it does when it runs on
    the OpenMP runtime torch has loaded, not when it loaded a second one of its own (a
    torch whose runtime goes by another library name), whose threads torch does not
    control. With torch at two threads (the least at which ``at::parallel_for`` goes
    parallel), a second runtime starts as many threads as there are cores."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        return int(module.parallel_threads(64)) <= 2
    finally:
        torch.set_num_threads(before)


def _load() -> ModuleType | None:
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from torch.utils.cpp_extension import load

    _log.info("Loading the fused CPU kernels (compiled at their first use on a machine).")
    openmp_possible = bool(_build_flags(openmp=True)[1])
    for openmp in (True, False) if openmp_possible else (False,):
        try:
            cflags, ldflags = _build_flags(openmp)
            module = load(_build_name(openmp), [str(_SOURCE)], extra_cflags=cflags,
                          extra_ldflags=ldflags, verbose=False)
        except Exception as err:  # noqa: BLE001 - any build failure falls back
            if openmp:  # a compiler without OpenMP: the kernels can still run on one thread
                _log.info("Building the fused CPU kernels with OpenMP failed (%s); "
                          "building them without.", err)
                continue
            warnings.warn(f"The fused CPU kernels are not available ({type(err).__name__}: "
                          f"{str(err).strip()[:300]}); the model runs unfused, which is "
                          f"slower. Set {_ENV}=0 to skip the attempt.", RuntimeWarning,
                          stacklevel=3)
            return None
        if openmp and not _shares_torch_threads(module):
            _log.info("The OpenMP build of the fused CPU kernels does not follow "
                      "torch.set_num_threads; using a build without OpenMP.")
            continue
        return module
    return None


def _module() -> ModuleType | None:
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"] = _load()
                _state["tried"] = True
    return _state["module"]


def fused_kernels_available() -> bool:
    """Whether the fused CPU kernels are built (building them at the first call).

    Returns
    -------
    bool
        False where they are turned off (``STEP_FUSED_KERNELS=0``) or could not be
        built.
    """
    return _state["off"] == 0 and _module() is not None


def fused_kernel_threads(pieces: int = 64) -> int:
    """How many threads the fused kernels split ``pieces`` pieces of work over.

    At most ``torch.get_num_threads()``; 1 where the kernels were built without OpenMP
    (off Linux, or with a torch that does not use it), which then run on one thread.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`).
    """
    _require()
    return int(_module().parallel_threads(int(pieces)))


@contextlib.contextmanager
def fused_kernels_off() -> Iterator[None]:
    """Run the block with the fused kernels turned off (in the whole process), for example
    to compare against the unfused operations or to count their FLOPs."""
    with _lock:
        _state["off"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["off"] -= 1


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: Tensor, heads: int, scale: float) -> Tensor:
        out, log_sum_exp = _module().attention_forward(qkv, heads, scale)
        ctx.save_for_backward(qkv, log_sum_exp)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        qkv, log_sum_exp = ctx.saved_tensors
        grad_qkv = _module().attention_backward(grad, qkv, log_sum_exp, ctx.heads, ctx.scale)
        return grad_qkv, None, None


def fused_self_attention(qkv: Tensor, heads: int, scale: float) -> Tensor:
    """Softmax self-attention from the packed projection of an encoder layer.

    Parameters
    ----------
    qkv
        ``F.linear(x, in_proj_weight, in_proj_bias)`` of ``x`` of shape
        ``(cells, tokens, width)``: shape ``(cells, tokens, 3 * width)``, one of
        :data:`FUSED_ATTENTION_DTYPES`, on the CPU, with queries, keys and values side
        by side. bfloat16 is computed in float32 (scores, softmax and sums), with the
        log-sum-exp kept for the backward pass in float32.
    heads
        Number of heads; ``width / heads`` must be one of :data:`FUSED_HEAD_DIMS`.
    scale
        Factor of the scores (usually ``head_dim ** -0.5``).

    Returns
    -------
    Tensor
        The heads' outputs side by side, shape ``(cells, tokens, width)``, in the dtype
        of ``qkv``, ready for the output projection. Differentiable with respect to
        ``qkv``.

    Raises
    ------
    RuntimeError
        If the kernel is not available (check :func:`fused_kernels_available`).
    """
    _require()
    return _FusedAttention.apply(qkv.contiguous(), heads, scale)


class _FusedBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, overwrite: bool
                ) -> tuple[Tensor, Tensor | None]:
        keep = any(ctx.needs_input_grad)
        in_h = keep and overwrite
        out, derivative = _module().bias_gelu_forward(h, bias, keep, in_h)
        ctx.save_for_backward(derivative, bias)
        ctx.set_materialize_grads(False)
        if not in_h:
            return out, None
        # h now holds the derivative: autograd is told, so that nothing reads it as h.
        ctx.mark_dirty(h)
        ctx.mark_non_differentiable(h)
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor | None, _: Any) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        derivative, bias = ctx.saved_tensors
        grad_h, grad_bias = _module().bias_gelu_backward(grad, derivative, bias)
        return grad_h, grad_bias, None


def fused_bias_gelu(h: Tensor, bias: Tensor, *, overwrite_h: bool = False) -> Tensor:
    """``gelu(h + bias)`` (the exact, erf-based GELU) in one pass, on the CPU.

    The pass also writes the GELU's derivative, which the backward pass multiplies by
    the incoming gradient (instead of evaluating erf again).

    Parameters
    ----------
    h
        A product without its bias, any shape whose last dimension is the bias's;
        float32, float64 or bfloat16 (a product under autocast).
    bias
        The bias, shape ``(h.shape[-1],)``, of the dtype of ``h`` (float32 for bfloat16
        ``h``).
    overwrite_h
        Keep the derivative in ``h``'s memory instead of a new buffer, for an ``h``
        that nothing else reads afterwards (a product made just for this call): one
        buffer of ``h``'s size fewer per call. ``h`` is then marked as modified in
        place, so autograd refuses a backward pass through anything that saved it.
        ``h`` must not be a leaf that requires gradients.

    Returns
    -------
    Tensor
        ``gelu(h + bias)`` in the dtype of ``h``, differentiable with respect to both
        inputs (once). In float32, erf is evaluated to an absolute error below 1.5e-7
        (the result is within 4e-7 of PyTorch's GELU); in float64 it is exact. For
        bfloat16 ``h`` the sum, the GELU and its derivative are computed in float32 and
        rounded once; the gradient of the bias is summed in float32.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`).
    """
    _require()
    return _FusedBiasGelu.apply(h.contiguous(), bias.contiguous(), overwrite_h)[0]


def _dropout_into(x: Tensor, bits: Tensor, threshold: int, scale: float,
                  dtype: torch.dtype) -> Tensor:
    out = torch.empty(x.shape, dtype=dtype)
    _module().dropout_apply(x, bits, threshold, scale, out)
    return out


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: Tensor, threshold: int, scale: float) -> Tensor:
        ctx.save_for_backward(bits)
        ctx.threshold, ctx.scale, ctx.dtype = threshold, scale, x.dtype
        return _dropout_into(x, bits, threshold, scale, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (bits,) = ctx.saved_tensors
        return _dropout_into(grad, bits, ctx.threshold, ctx.scale, ctx.dtype), None, None, None


def fused_dropout(x: Tensor, bits: Tensor, threshold: int, scale: float) -> Tensor:
    """Dropout decided by random 16-bit chunks, in one pass and without a mask tensor.

    Element ``i`` is kept, and multiplied by ``scale``, where the ``i``-th 16-bit chunk
    of ``bits`` (read as a signed integer) is at least ``threshold``; otherwise it is
    multiplied by zero. The gradient is masked the same way.

    Parameters
    ----------
    x
        Activations, one of :data:`FUSED_DROPOUT_DTYPES`, on the CPU. bfloat16 is
        multiplied in float32 and rounded once.
    bits
        Random int64 values, at least ``ceil(x.numel() / 4)`` of them.
    threshold
        In ``[-32768, 32767]``.
    scale
        Factor of the kept elements.

    Returns
    -------
    Tensor
        The result, shaped like ``x``, in its dtype; the same values as
        ``(x * torch.where(bits.view(torch.int16)[:n].view(x.shape) >= threshold, scale,
        0)).to(x.dtype)``.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`).
    """
    _require()
    return _FusedDropout.apply(x, bits, threshold, scale)


class _FusedResidualDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, residual: Tensor, x: Tensor, bits: Tensor, threshold: int,
                scale: float) -> Tensor:
        ctx.save_for_backward(bits)
        ctx.threshold, ctx.scale, ctx.dtype = threshold, scale, x.dtype
        return _module().dropout_add(residual, x, bits, threshold, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        (bits,) = ctx.saved_tensors
        grad_x = _dropout_into(grad, bits, ctx.threshold, ctx.scale, ctx.dtype)
        return grad, grad_x, None, None, None


def fused_residual_dropout(residual: Tensor, x: Tensor, bits: Tensor, threshold: int,
                           scale: float) -> Tensor:
    """``residual + fused_dropout(x, ...)`` in one pass, as a residual connection adds a
    dropped-out branch.

    Parameters
    ----------
    residual
        The residual stream, float32 or float64, on the CPU.
    x
        The branch, shaped like ``residual``, of its dtype or, under a float32 residual,
        bfloat16 (an encoder branch under bfloat16 autocast).
    bits, threshold, scale
        As for :func:`fused_dropout`.

    Returns
    -------
    Tensor
        In the residual's dtype; bit for bit ``residual + fused_dropout(x, ...)``
        (for a bfloat16 branch: the dropout computed in float32, not rounded back).
        The gradient of ``x`` is returned in its dtype.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`), or the
        shapes or dtypes do not fit.
    """
    _require()
    return _FusedResidualDropout.apply(residual, x, bits, threshold, scale)


class _FusedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                dtype: torch.dtype) -> Tensor:
        out = torch.empty(x.shape, dtype=dtype)
        mean, rstd = _module().layer_norm_forward(x, weight, bias, eps, out)
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        grad_x, grad_weight, grad_bias = _module().layer_norm_backward(grad, *ctx.saved_tensors)
        return grad_x, grad_weight, grad_bias, None, None


def fused_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                     dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm over the last dimension in one pass per row, optionally written in
    bfloat16, on the CPU.

    Parameters
    ----------
    x
        Input, float32 or float64.
    weight, bias
        Vectors of the last dimension's size, in the dtype of ``x``.
    eps
        Added to the variance.
    dtype
        Dtype of the result: that of ``x`` (None), or bfloat16 for float32 ``x`` (under
        bfloat16 autocast the next product reads bfloat16, so the cast is folded in).

    Returns
    -------
    Tensor
        ``F.layer_norm(x, (width,), weight, bias, eps)`` computed in the dtype of ``x``
        (mean and variance in two passes over the row) and rounded once to ``dtype``;
        differentiable (once) with respect to ``x``, ``weight`` and ``bias``, whose
        gradients have their dtypes, whatever the gradient of the result is.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`), or the
        shapes or dtypes do not fit.
    """
    _require()
    return _FusedLayerNorm.apply(x.contiguous(), weight.contiguous(), bias.contiguous(),
                                 float(eps), x.dtype if dtype is None else dtype)


class _FusedCountLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, log_mu: Tensor, log_theta: Tensor,
                pi_logits: Tensor | None) -> Tensor:
        grads = any(ctx.needs_input_grad[1:])
        value, d_mu, d_theta, d_pi = _module().count_log_prob(
            x, log_mu, log_theta, torch.exp(log_theta), pi_logits, grads)
        ctx.save_for_backward(d_mu, d_theta, d_pi)
        ctx.theta_shape = log_theta.shape
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d_mu, d_theta, d_pi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_mu = grad * d_mu if needs[1] else None
        grad_theta = (grad * d_theta).sum_to_size(ctx.theta_shape) if needs[2] else None
        grad_pi = grad * d_pi if needs[3] else None
        return None, grad_mu, grad_theta, grad_pi


def fused_count_log_prob(x: Tensor, log_mu: Tensor, log_theta: Tensor,
                         pi_logits: Tensor | None = None) -> Tensor:
    """Negative binomial log-probability of counts, zero-inflated where ``pi_logits`` is
    given, in two passes over the data, on the CPU.

    The values are those of :func:`step.models._likelihoods.log_nb_from_logs` and
    :func:`~step.models._likelihoods.log_zinb_from_logs` (same parametrisation; zeros of
    the zero-inflated model are the counts below 0.5). The gamma-function terms are
    evaluated in float64 (exactly, as a finite product and sum, for integer counts up to
    16), so the float32 result is at least as accurate as the unfused formula's.

    Parameters
    ----------
    x
        Counts, shape ``(cells, genes)``, float32 or float64; not differentiated.
    log_mu
        Log means, the shape and dtype of ``x``.
    log_theta
        Log inverse dispersions, ``(genes,)`` or ``(cells, genes)``.
    pi_logits
        Zero-inflation logits, the shape of ``x``, or None for the plain negative
        binomial.

    Returns
    -------
    Tensor
        ``log p(x)``, shape ``(cells, genes)``, differentiable (once) with respect to
        ``log_mu``, ``log_theta`` and ``pi_logits``.

    Raises
    ------
    RuntimeError
        If the kernels are not available (check :func:`fused_kernels_available`), or the
        shapes or dtypes do not match.
    """
    _require()
    if x.requires_grad:
        msg = "the fused likelihood does not differentiate with respect to the counts"
        raise RuntimeError(msg)
    contiguous = [t.contiguous() if t is not None else None
                  for t in (x, log_mu, log_theta, pi_logits)]
    return _FusedCountLogProb.apply(*contiguous)


def _require() -> None:
    if _module() is None:
        msg = "the fused CPU kernels are not available"
        raise RuntimeError(msg)
