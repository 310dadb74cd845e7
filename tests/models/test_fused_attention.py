"""The fused CPU attention kernel: exact gradients, the unfused path's results, fallbacks."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from step.models import _fused_attention as fused
from step.models._blocks import transformer_encoder

CAN_BUILD = shutil.which("ninja") is not None and shutil.which("c++") is not None

needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs a C++ compiler and ninja")


def _reference(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    n, t, width3 = qkv.shape
    width = width3 // 3
    q, k, v = qkv.view(n, t, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, t, width)


@needs_kernel
def test_kernel_builds_where_a_compiler_is_present() -> None:
    assert fused.fused_attention_available()


@needs_kernel
@pytest.mark.parametrize("heads", [2, 4])
def test_gradients_are_exact_in_float64(heads: int) -> None:
    """Head sizes 8 and 4 (width 16 and 16 split into 2 and 4 heads)."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 7, 3 * 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: fused.fused_self_attention(x, heads, 0.4), (qkv,))
    torch.testing.assert_close(fused.fused_self_attention(qkv, heads, 0.4),
                               _reference(qkv, heads, 0.4))


@needs_kernel
@pytest.mark.parametrize(("heads", "tokens"), [(8, 33), (16, 9), (8, 1)])
def test_float32_matches_the_unfused_computation(heads: int, tokens: int) -> None:
    torch.manual_seed(1)
    qkv = (3 * torch.randn(20, tokens, 3 * 64)).requires_grad_()
    weights = torch.randn(20, tokens, 64)
    ours = fused.fused_self_attention(qkv, heads, (64 // heads) ** -0.5)
    ref = _reference(qkv, heads, (64 // heads) ** -0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), qkv)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), qkv)
    # scores of up to about 50 here: the recomputed weights carry float32 rounding of that
    # size, so the gradients are compared on their own scale
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5 * scale)


@needs_kernel
def test_results_do_not_depend_on_the_number_of_threads() -> None:
    torch.manual_seed(2)
    qkv = torch.randn(64, 33, 3 * 64, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = fused.fused_self_attention(qkv, 8, 0.35)
            (grad,) = torch.autograd.grad(out.square().sum(), qkv)
            results.append((out, grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@needs_kernel
def test_encoder_uses_the_kernel_for_narrow_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = fused.fused_self_attention

    def counting(*args):
        calls.append(args[1])
        return original(*args)

    monkeypatch.setattr("step.models._blocks.fused_self_attention", counting)
    x = torch.randn(4, 33, 64)
    transformer_encoder(64, n_layers=2, n_heads=8, dropout=0.1).train()(x)
    assert calls == [8, 8]
    calls.clear()
    transformer_encoder(64, n_layers=1, n_heads=4, dropout=0.1)(x)  # 16-dim heads: unfused
    with torch.autocast("cpu", dtype=torch.bfloat16):  # reduced precision: unfused
        transformer_encoder(64, n_layers=1, n_heads=8, dropout=0.1)(x)
    assert calls == []


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("must not build when turned off")

    monkeypatch.setenv("STEP_FUSED_ATTENTION", "0")
    monkeypatch.setattr("torch.utils.cpp_extension.load", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused._load() is None


def test_a_failed_build_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("STEP_FUSED_ATTENTION", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert fused._load() is None
    monkeypatch.setitem(fused._state, "tried", True)
    monkeypatch.setitem(fused._state, "module", None)
    assert not fused.fused_attention_available()
    with pytest.raises(RuntimeError, match="not available"):
        fused.fused_self_attention(torch.randn(2, 3, 3 * 16), 2, 0.5)
    # the encoder still trains, through the unfused path
    enc = transformer_encoder(64, n_layers=1, n_heads=8, dropout=0.0)
    x = torch.randn(2, 9, 64, requires_grad=True)
    enc(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_build_name_follows_the_source_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    name = fused._build_name()
    assert name.startswith("step_fused_attention_")
    monkeypatch.setattr(fused, "_cpu_signature", lambda: "another cpu")
    assert fused._build_name() != name
