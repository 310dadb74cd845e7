"""Optional ``torch.compile`` of the loss computation and its fallback to eager mode."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from step.functionality.comps.trainer import Trainer, seed_everything
from step.functionality.comps.trainer._compile import LossCompiler, check_compile

from ._toy import ToyVAE, dict_batches, toy_counts


def _train(**kw):
    seed_everything(0)
    t = Trainer(ToyVAE(dropout=0.0), seed=0, early_stopping=False, verbose=False, **kw)
    t.init_optimizer(lr=1e-2)
    t.train_batch(3, (dict_batches(toy_counts(), 40, shuffle=True), None))
    return t


def test_check_compile():
    assert check_compile(False) is None
    assert check_compile(None) is None
    assert check_compile(True) == "default"
    assert check_compile("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile"):
        check_compile(3)
    with pytest.raises(ValueError, match="compile"):
        Trainer(ToyVAE(), compile=1.5)


def test_off_by_default():
    t = Trainer(ToyVAE(), verbose=False)
    assert not t.plan.compiler.active


def test_failing_compiler_warns_once_and_trains_eagerly(monkeypatch):
    calls = []

    def broken_compile(fn, **kw):
        calls.append(kw)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = _train(compile=True)
    msgs = [w for w in caught if "torch.compile is not usable" in str(w.message)]
    assert len(msgs) == 1 and "no compiler here" in str(msgs[0].message)
    assert len(calls) == 1 and t.plan.compiler.failed
    eager = _train()
    np.testing.assert_allclose(t.history["recon_loss"], eager.history["recon_loss"])


def test_failure_at_the_first_call_falls_back():
    compiler = LossCompiler("default")

    def fn(x):
        return x + 1

    compiler._compiled["f"] = lambda x: (_ for _ in ()).throw(RuntimeError("backend"))
    with pytest.warns(RuntimeWarning, match="uncompiled"):
        assert compiler("f", fn, 1) == 2
    assert compiler("f", fn, 2) == 3 and compiler.failed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compiled_loss_matches_eager():
    """About a minute on a small CPU, most of it compiling."""
    x = {"x": toy_counts(32), "library": toy_counts(32).sum(1)}
    eager = Trainer(ToyVAE(), seed=0, verbose=False)
    compiled = Trainer(ToyVAE(), seed=0, verbose=False, compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    with eager.plan.evaluation(), compiled.plan.evaluation():
        want = eager.plan.loss(x)
        got = compiled.plan.loss(x)
    assert not compiled.plan.compiler.failed
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_mode_is_passed_to_torch_compile(monkeypatch):
    modes = []

    def fake_compile(fn, *, mode=None):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    t = _train(compile="reduce-overhead")
    assert modes == ["reduce-overhead"] and t.plan.compiler.active
    assert np.isfinite(t.history["recon_loss"]).all()
