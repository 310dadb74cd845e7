"""The fused CPU kernels (attention, bias + GELU, dropout, residual dropout, LayerNorm):
exact gradients, the unfused results, fallbacks."""

from __future__ import annotations

import contextlib
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from step.models import _fused as fused
from step.models._blocks import FastDropout, transformer_encoder

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
    assert fused.fused_kernels_available()


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
@pytest.mark.parametrize(("heads", "width", "tokens"),
                         [(8, 64, 33), (16, 64, 9), (8, 64, 1), (8, 64, 8),
                          (12, 96, 33)])  # 12 heads of 8: one full group, one of four
def test_float32_matches_the_unfused_computation(heads: int, width: int, tokens: int) -> None:
    torch.manual_seed(1)
    qkv = (3 * torch.randn(20, tokens, 3 * width)).requires_grad_()
    weights = torch.randn(20, tokens, width)
    ours = fused.fused_self_attention(qkv, heads, (width // heads) ** -0.5)
    ref = _reference(qkv, heads, (width // heads) ** -0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), qkv)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), qkv)
    # scores of up to about 50 here: the recomputed weights carry float32 rounding of that
    # size, so the gradients are compared on their own scale
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5 * scale)


@needs_kernel
def test_bfloat16_is_computed_in_float32() -> None:
    """bfloat16 in and out, as under autocast: the result is the float32 computation on
    the same bfloat16 inputs, rounded once, and more accurate than bfloat16 matmuls."""
    torch.manual_seed(6)
    qkv = (2 * torch.randn(24, 33, 3 * 64)).bfloat16().requires_grad_()
    weights = torch.randn(24, 33, 64)
    ours = fused.fused_self_attention(qkv, 8, 8**-0.5)
    assert ours.dtype == torch.bfloat16
    exact_in = qkv.detach().float().requires_grad_()
    exact = _reference(exact_in, 8, 8**-0.5)
    # one rounding of the float32 result to bfloat16 (8 bits of mantissa)
    assert ((ours.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    bf16_matmuls = _reference(qkv.detach(), 8, 8**-0.5).float()
    assert (ours.float() - exact).abs().mean() < 0.5 * (bf16_matmuls - exact).abs().mean()
    (grad_ours,) = torch.autograd.grad((ours.float() * weights).sum(), qkv)
    (grad_exact,) = torch.autograd.grad((exact * weights).sum(), exact_in)
    assert grad_ours.dtype == torch.bfloat16
    scale = grad_exact.abs().max().item()
    # the output is rounded to bfloat16 before the gradient flows back: a few roundings
    torch.testing.assert_close(grad_ours.float(), grad_exact, rtol=2e-2, atol=2e-2 * scale)


@needs_kernel
def test_second_derivatives_are_refused_not_wrong() -> None:
    qkv = torch.randn(2, 5, 3 * 16, requires_grad=True)
    (grad,) = torch.autograd.grad(fused.fused_self_attention(qkv, 2, 0.5).sum(), qkv,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="grad"):
        grad.sum().backward()


@needs_kernel
@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="the kernels are built with OpenMP on Linux only")
def test_kernels_split_their_work_over_torchs_threads() -> None:
    if fused._module().__name__ != fused._build_name(openmp=True):
        pytest.skip("the single-thread build is in use: the OpenMP build failed, or it ran "
                    "on an OpenMP runtime of its own")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fused.fused_kernel_threads(64) == 1
        torch.set_num_threads(2)
        assert fused.fused_kernel_threads(64) == 2
        assert fused.fused_kernel_threads(1) == 1
    finally:
        torch.set_num_threads(before)


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
def test_bias_gelu_gradients_are_exact_in_float64() -> None:
    torch.manual_seed(3)
    h = (3 * torch.randn(70, 12, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(fused.fused_bias_gelu, (h, bias))
    torch.testing.assert_close(fused.fused_bias_gelu(h, bias), F.gelu(h + bias))


@needs_kernel
def test_bias_gelu_float32_is_within_its_stated_error() -> None:
    # 200 rows: several pieces of work, so the bias gradient sums partial sums
    u = torch.linspace(-9, 9, 200 * 97).reshape(200, 97).requires_grad_()
    bias = (0.1 * torch.randn(97)).requires_grad_()
    grad = torch.randn(200, 97)
    ours = fused.fused_bias_gelu(u, bias)
    exact = F.gelu((u + bias).double())
    assert (ours.double() - exact).abs().max() < 5e-7
    grad_u, grad_bias = torch.autograd.grad(ours, (u, bias), grad)
    ref_u, ref_bias = torch.autograd.grad(F.gelu(u + bias), (u, bias), grad)
    torch.testing.assert_close(grad_u, ref_u, rtol=0, atol=5e-7 * grad.abs().max().item())
    torch.testing.assert_close(grad_bias, ref_bias, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_bias_gelu_gives_no_subnormal_numbers() -> None:
    """Far in the negative tail the GELU is exactly 0, not a subnormal number: CPUs compute
    subnormals in slow microcode, here and in the products that read the result."""
    u = torch.linspace(-60, 0, 6001).reshape(1, -1).requires_grad_()
    bias = torch.zeros(6001, requires_grad=True)
    out = fused.fused_bias_gelu(u, bias)
    (grad,) = torch.autograd.grad(out.sum(), u)
    tiny = torch.finfo(torch.float32).tiny
    for values in (out, grad):
        assert not ((values != 0) & (values.abs() < tiny)).any()
    assert (out[0, :200] == 0).all()  # u <= -58
    assert (out.double() - F.gelu(u.double())).abs().max() < 5e-7


@needs_kernel
def test_dropout_gives_the_unfused_values_bit_for_bit() -> None:
    drop = FastDropout(0.3).train()
    x = torch.randn(5, 7, 11).transpose(0, 1).requires_grad_()  # odd size, strided
    grad = torch.randn(7, 5, 11)
    results = []
    for off in (False, True):
        torch.manual_seed(5)
        with fused.fused_kernels_off() if off else contextlib.nullcontext():
            out = drop(x)
            (g,) = torch.autograd.grad(out, x, grad)
        results.append((out, g))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert 0 < (results[0][0] == 0).float().mean() < 0.6


@needs_kernel
def test_bias_gelu_in_bfloat16_is_the_float32_computation_rounded() -> None:
    """A bfloat16 product with a float32 bias: the GELU of the float32 sum, rounded once;
    the gradient of h is the incoming gradient times the derivative, each rounded to
    bfloat16, and the bias gradient their float32 sum over the rows."""
    torch.manual_seed(2)
    h = (3 * torch.randn(70, 33, 48)).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(48, requires_grad=True)
    grad = torch.randn(70, 33, 48).to(torch.bfloat16)
    out = fused.fused_bias_gelu(h, bias)
    assert out.dtype == torch.bfloat16
    ref32 = fused.fused_bias_gelu(h.detach().float(), bias.detach())
    assert torch.equal(out, ref32.to(torch.bfloat16))
    grad_h, grad_bias = torch.autograd.grad(out, [h, bias], grad)
    assert grad_h.dtype == torch.bfloat16 and grad_bias.dtype == torch.float32
    h32 = h.detach().float().requires_grad_()
    (derivative,) = torch.autograd.grad(fused.fused_bias_gelu(h32, bias.detach()).sum(), h32)
    expected = grad.float() * derivative.to(torch.bfloat16).float()  # exact in float32
    assert torch.equal(grad_h, expected.to(torch.bfloat16))
    torch.testing.assert_close(grad_bias, expected.sum((0, 1)), rtol=1e-5, atol=1e-4)
    # against the exact GELU in float64: bfloat16's own precision
    u = (h.detach().double() + bias.detach().double()).requires_grad_()
    (grad_ref,) = torch.autograd.grad(F.gelu(u), u, grad.double())
    assert ((grad_h.double() - grad_ref).abs() <= 2 * 2**-8 * grad_ref.abs() + 1e-6).all()


@needs_kernel
@pytest.mark.parametrize("autocast", [False, True])
def test_bias_gelu_over_its_input_gives_the_same_results(autocast: bool) -> None:
    """The derivative kept in the product's memory: same output, same gradients, and
    the product is marked as modified."""
    torch.manual_seed(3)
    x, weight = torch.randn(6, 33, 64, requires_grad=True), torch.randn(256, 64, requires_grad=True)
    bias = torch.randn(256, requires_grad=True)
    results = []
    for overwrite in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = torch.matmul(x, weight.t())
            version = h._version
            out = fused.fused_bias_gelu(h, bias, overwrite_h=overwrite)
        assert (h._version > version) == overwrite
        grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, 256)).sum(),
                                    (x, weight, bias))
        results.append((out, *grads))
    for plain, over in zip(*results):
        assert torch.equal(plain, over)
    if not autocast:  # a backward pass that would read h as the product is refused
        h = torch.matmul(x, weight.t())
        saved = h.sin()  # keeps h for its own backward pass
        out = fused.fused_bias_gelu(h, bias, overwrite_h=True)
        with pytest.raises(RuntimeError, match="inplace"):
            (saved.sum() + out.sum()).backward()


@needs_kernel
def test_bias_gelu_without_gradients_matches_with() -> None:
    h, bias = torch.randn(9, 16), torch.randn(16)
    with torch.no_grad():
        plain = fused.fused_bias_gelu(h, bias)
    assert torch.equal(plain, fused.fused_bias_gelu(h.requires_grad_(), bias))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_dropout_is_the_dropout_then_the_sum(dtype: torch.dtype) -> None:
    """One pass gives, bit for bit, the residual plus the dropped-out branch (a bfloat16
    branch scaled in float32 and not rounded before the sum); the branch's gradient is
    the masked, scaled incoming gradient in the branch's dtype."""
    drop = FastDropout(0.25).train()
    residual = torch.randn(6, 33, 40, requires_grad=True)
    x = torch.randn(6, 33, 40).to(dtype).requires_grad_()
    grad = torch.randn(6, 33, 40)
    torch.manual_seed(7)
    out = drop.add_to(residual, x)
    grads = torch.autograd.grad(out, [residual, x], grad)
    torch.manual_seed(7)
    bits = FastDropout._cpu_bits(x)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= drop._threshold
    factor = torch.where(keep, drop._scale, 0.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, residual + x.float() * factor)
    assert torch.equal(grads[0], grad)
    assert grads[1].dtype == dtype and torch.equal(grads[1], (grad * factor).to(dtype))
    assert 0.15 < (~keep).float().mean() < 0.35
    # the random draws are those of the dropout alone
    torch.manual_seed(7)
    assert torch.equal(drop(x), (x.float() * factor).to(dtype))


@needs_kernel
def test_residual_dropout_falls_back_with_the_same_draws() -> None:
    drop = FastDropout(0.3).train()
    residual, x = torch.randn(5, 7, 12), torch.randn(5, 7, 12)
    results = []
    for off in (False, True):
        torch.manual_seed(3)
        with fused.fused_kernels_off() if off else contextlib.nullcontext():
            results.append(drop.add_to(residual, x))
    assert torch.equal(results[0], results[1])
    drop.eval()
    assert torch.equal(drop.add_to(residual, x), residual + x)


@needs_kernel
def test_bfloat16_dropout_scales_in_float32() -> None:
    """The unfused and fused bfloat16 dropout both multiply by the float32 factor (1 / 0.9
    is not a bfloat16 number) and round once, so the kept values stay unbiased."""
    drop = FastDropout(0.1).train()
    x = torch.randn(4, 9, 30).to(torch.bfloat16)
    results = []
    for off in (False, True):
        torch.manual_seed(11)
        with fused.fused_kernels_off() if off else contextlib.nullcontext():
            results.append(drop(x))
    assert torch.equal(results[0], results[1])
    kept = results[0] != 0
    expected = (x.float() * drop._scale).to(torch.bfloat16)
    assert torch.equal(results[0][kept], expected[kept])


@needs_kernel
def test_layer_norm_gradients_are_exact_in_float64() -> None:
    torch.manual_seed(0)
    x = (2 * torch.randn(4, 3, 16, dtype=torch.float64) + 1).requires_grad_()
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: fused.fused_layer_norm(*a, 1e-5), (x, weight, bias))
    torch.testing.assert_close(fused.fused_layer_norm(x, weight, bias, 1e-5),
                               F.layer_norm(x, (16,), weight, bias, 1e-5))


@needs_kernel
def test_layer_norm_in_float32_and_into_bfloat16() -> None:
    torch.manual_seed(1)
    x = (3 * torch.randn(50, 33, 64) + 2).requires_grad_()
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    grad = torch.randn(50, 33, 64)
    ref = F.layer_norm(x, (64,), weight, bias, 1e-5)
    ref_grads = torch.autograd.grad(ref, [x, weight, bias], grad)
    ours = fused.fused_layer_norm(x, weight, bias, 1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [x, weight, bias], grad, retain_graph=True),
                    ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # written in bfloat16: the float32 result rounded once; gradients from a bfloat16
    # gradient are those of float32 with that gradient, in float32
    low = fused.fused_layer_norm(x, weight, bias, 1e-5, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and torch.equal(low, ours.to(torch.bfloat16))
    grad16 = grad.to(torch.bfloat16)
    got = torch.autograd.grad(low, [x, weight, bias], grad16)
    want = torch.autograd.grad(ours, [x, weight, bias], grad16.float())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_layer_norm_results_do_not_depend_on_the_thread_count() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 64, requires_grad=True)
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    grad = torch.randn(300, 64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = fused.fused_layer_norm(x, weight, bias, 1e-5)
            results.append((out, *torch.autograd.grad(out, [x, weight, bias], grad)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernel
def test_encoder_layer_under_autocast_matches_the_unfused_layer() -> None:
    """With dropout, under bfloat16 autocast, the fused layer (LayerNorm into bfloat16,
    fused GELU, residual dropout) stays within bfloat16's precision of the unfused one
    with the same random draws, outputs and gradients alike."""
    torch.manual_seed(4)
    enc = transformer_encoder(64, n_layers=2, n_heads=8, dropout=0.1).train()
    x = torch.randn(16, 33, 64, requires_grad=True)
    results = []
    for off in (False, True):
        torch.manual_seed(9)
        with fused.fused_kernels_off() if off else contextlib.nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *enc.parameters()])
        results.append((out.float(), grads))
    scale = results[1][0].abs().max()
    assert (results[0][0] - results[1][0]).abs().max() < 0.03 * scale
    for a, b in zip(results[0][1], results[1][1]):
        assert (a - b).norm() < 0.05 * b.norm() + 1e-6


@needs_kernel
def test_bias_gelu_refuses_a_bias_of_the_wrong_size() -> None:
    with pytest.raises(RuntimeError, match="bias"):
        fused.fused_bias_gelu(torch.randn(4, 6), torch.randn(5))


@needs_kernel
def test_encoder_uses_the_kernel_for_narrow_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = fused.fused_self_attention

    def counting(*args):
        calls.append(args[1])
        return original(*args)

    gelu_calls = []
    original_gelu = fused.fused_bias_gelu

    def counting_gelu(*args, **kwargs):
        gelu_calls.append(args[0].shape)
        return original_gelu(*args, **kwargs)

    monkeypatch.setattr("step.models._blocks.fused_self_attention", counting)
    monkeypatch.setattr("step.models._blocks.fused_bias_gelu", counting_gelu)
    x = torch.randn(4, 33, 64)
    transformer_encoder(64, n_layers=2, n_heads=8, dropout=0.1).train()(x)
    assert calls == [8, 8]
    assert gelu_calls == [(4, 33, 256)] * 2
    calls.clear()
    gelu_calls.clear()
    transformer_encoder(64, n_layers=1, n_heads=4, dropout=0.1)(x)  # 16-dim heads: unfused
    assert calls == [] and len(gelu_calls) == 1  # the feed-forward block still fuses
    gelu_calls.clear()
    # under bfloat16 autocast both kernels take the bfloat16 products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        transformer_encoder(64, n_layers=1, n_heads=8, dropout=0.1)(x)
    assert calls == [8] and gelu_calls == [(4, 33, 256)]


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("must not build when turned off")

    monkeypatch.setenv("STEP_FUSED_KERNELS", "0")
    monkeypatch.setattr("torch.utils.cpp_extension.load", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused._load() is None


def test_a_failed_build_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("STEP_FUSED_KERNELS", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert fused._load() is None
    monkeypatch.setitem(fused._state, "tried", True)
    monkeypatch.setitem(fused._state, "module", None)
    assert not fused.fused_kernels_available()
    with pytest.raises(RuntimeError, match="not available"):
        fused.fused_self_attention(torch.randn(2, 3, 3 * 16), 2, 0.5)
    with pytest.raises(RuntimeError, match="not available"):
        fused.fused_bias_gelu(torch.randn(2, 3), torch.randn(3))
    # the encoder still trains, through the unfused path
    enc = transformer_encoder(64, n_layers=1, n_heads=8, dropout=0.0)
    x = torch.randn(2, 9, 64, requires_grad=True)
    enc(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@needs_kernel
def test_kernels_can_be_turned_off_for_a_block() -> None:
    assert fused.fused_kernels_available()
    with fused.fused_kernels_off():
        assert not fused.fused_kernels_available()
        with fused.fused_kernels_off():
            assert not fused.fused_kernels_available()
        assert not fused.fused_kernels_available()
    assert fused.fused_kernels_available()


@needs_kernel
def test_encoder_matches_its_unfused_computation() -> None:
    torch.manual_seed(4)
    enc = transformer_encoder(64, n_layers=2, n_heads=8, dropout=0.0)
    x = torch.randn(8, 33, 64, requires_grad=True)
    results = []
    for off in (False, True):
        with fused.fused_kernels_off() if off else contextlib.nullcontext():
            out = enc(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *enc.parameters()])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_build_without_openmp_is_tried_when_the_openmp_build_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tried = []

    def openmp_fails(name, sources, *, extra_cflags, extra_ldflags, **kwargs):
        tried.append((name, list(extra_cflags)))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("unrecognized command-line option '-fopenmp'")
        return "module"  # the single-thread build: not checked for threads

    monkeypatch.delenv("STEP_FUSED_KERNELS", raising=False)
    monkeypatch.setattr(fused.sys, "platform", "linux")
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils.cpp_extension.load", openmp_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused._load() == "module"
    assert [("-fopenmp" in flags) for _, flags in tried] == [True, False]
    assert tried[0][0] != tried[1][0]  # separate builds in the cache


def test_an_openmp_build_with_its_own_threads_is_not_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenMP build that ignores torch.set_num_threads (a second OpenMP runtime) is
    replaced by the single-thread build."""

    class Build:
        def __init__(self, openmp: bool) -> None:
            self.openmp = openmp

        def parallel_threads(self, pieces: int) -> int:
            return 4 if self.openmp else 1

    def build(name, sources, *, extra_cflags, extra_ldflags, **kwargs):
        return Build("-fopenmp" in extra_cflags)

    monkeypatch.delenv("STEP_FUSED_KERNELS", raising=False)
    monkeypatch.setattr(fused.sys, "platform", "linux")
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils.cpp_extension.load", build)
    before = torch.get_num_threads()
    module = fused._load()
    assert isinstance(module, Build) and not module.openmp
    assert torch.get_num_threads() == before


@needs_kernel
def test_the_build_in_use_follows_torchs_thread_setting() -> None:
    assert fused._shares_torch_threads(fused._module())


def test_build_name_follows_the_source_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    name = fused._build_name()
    assert name.startswith("step_fused_cpu_")
    monkeypatch.setattr(fused, "_cpu_signature", lambda: "another cpu")
    assert fused._build_name() != name


@needs_kernel
def test_elementwise_kernels_do_not_depend_on_the_thread_count() -> None:
    """GELU, dropout, residual dropout and the likelihood, forward and backward, on
    enough rows that two threads each get several pieces of work."""
    torch.manual_seed(4)
    h = torch.randn(600, 256, requires_grad=True)
    bias = torch.randn(256, requires_grad=True)
    residual = torch.randn(600, 256, requires_grad=True)
    bits = FastDropout._cpu_bits(h)
    counts = torch.poisson(torch.rand(300, 500) * 4)
    log_mu = torch.randn(300, 500, requires_grad=True)
    log_theta = torch.randn(300, 500, requires_grad=True)
    pi_logits = torch.randn(300, 500, requires_grad=True)
    leaves = [h, bias, residual, log_mu, log_theta, pi_logits]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            gelu = fused.fused_bias_gelu(h, bias)
            dropped = fused.fused_dropout(gelu, bits, -29491, 1 / 0.9)
            summed = fused.fused_residual_dropout(residual, dropped, bits, -3277, 1 / 0.6)
            log_p = fused.fused_count_log_prob(counts, log_mu, log_theta, pi_logits)
            loss = summed.square().sum() + log_p.sum()
            results.append((gelu, dropped, summed, log_p,
                            *torch.autograd.grad(loss, leaves)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
