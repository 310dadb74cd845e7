"""Training precision: the ``"auto"`` choice, bf16 on the CPU, the ``amp`` alias."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step.functionality.comps.trainer import Trainer
from step.functionality.comps.trainer import _device

from ._toy import ToyVAE, dict_batches, toy_counts

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _cpuinfo_has_native_bf16() -> bool:
    """Read the flags here, independently of the package."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def test_auto_matches_this_machine():
    expected = "bf16" if _cpuinfo_has_native_bf16() else "fp32"
    t = Trainer(ToyVAE(), precision="auto", verbose=False)
    assert t.precision == expected
    assert t.plan.amp == (None if expected == "fp32" else "bf16")


def test_default_is_fp32():
    t = Trainer(ToyVAE(), verbose=False)
    assert t.precision == "fp32" and t.plan.amp is None


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ({"avx2", "avx512f"}, "AVX512", False),
    ({"avx2", "avx512_bf16"}, "AVX512", True),
    ({"amx_tile", "amx_bf16"}, "AVX512", True),
    (set(), "AVX2", False),
    (set(), "AVX512_AMX", True),
])
def test_native_bf16_on_cpu(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(_device, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert _device.native_bf16(CPU) is expected
    assert _device.resolve_precision("auto", None, CPU) == ("bf16" if expected else "fp32")


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), False), ((8, 0), True),
                                                      ((9, 0), True)])
def test_native_bf16_on_cuda(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert _device.native_bf16(CUDA) is expected
    assert _device.resolve_precision("auto", None, CUDA) == ("bf16" if expected else "fp32")
    assert _device.resolve_precision(None, "auto", CUDA) == ("bf16" if expected else "fp32")


def test_native_bf16_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device.native_bf16(CUDA) is False
    assert _device.native_bf16(torch.device("meta")) is False


def test_amp_is_an_alias():
    assert _device.resolve_precision(None, None, CPU) == "fp32"
    assert _device.resolve_precision(None, "bf16", CPU) == "bf16"
    assert _device.resolve_precision("bf16", "bf16", CPU) == "bf16"
    assert _device.resolve_precision("fp32", None, CPU) == "fp32"
    assert Trainer(ToyVAE(), amp="bf16", verbose=False).precision == "bf16"


def test_bad_and_conflicting_settings():
    with pytest.raises(ValueError, match="disagree"):
        Trainer(ToyVAE(), precision="fp32", amp="bf16")
    with pytest.raises(ValueError, match="precision must be"):
        Trainer(ToyVAE(), precision="fp64")
    with pytest.raises(ValueError, match="amp"):
        Trainer(ToyVAE(), amp="int8")
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(ToyVAE(), precision="fp16")


def test_bf16_training_on_cpu_lowers_the_loss():
    t = Trainer(ToyVAE(dropout=0.0), seed=0, precision="bf16", early_stopping=False,
                verbose=False)
    t.init_optimizer(lr=1e-2)
    t.train_batch(6, (dict_batches(toy_counts(), 16, shuffle=True), None))
    recon = np.asarray(t.history["recon_loss"], dtype=float)
    assert np.isfinite(recon).all()
    assert recon[-1] < recon[0]
