"""Failure handling: NaN losses, killed and terminated processes, data-parallel runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from step.functionality.comps.trainer import NonFiniteError, Trainer

from ._toy import ToyVAE, dict_batches, toy_counts

SCRIPT = Path(__file__).with_name("_script.py")
ROOT = SCRIPT.parents[2]


def _nan_at(step_numbers):
    calls = {"n": 0}

    def call_func(inputs):
        out = trainer_ref[0].model.loss(inputs)
        if trainer_ref[0].model.training:
            calls["n"] += 1
            if calls["n"] in step_numbers:
                out["kl_loss"] = out["kl_loss"] * float("nan")
        return out

    trainer_ref = []
    return call_func, trainer_ref


def test_nan_steps_are_skipped_and_rolled_back():
    call_func, ref = _nan_at(set(range(9, 13)))
    t = Trainer(ToyVAE(), seed=0, verbose=False, max_bad_steps=3, on_nonfinite="rollback")
    ref.append(t)
    t.init_optimizer(lr=1e-2)
    lr0 = t.optimizer.param_groups[0]["lr"]
    t.set_lr_scheduler(kind="constant")
    t.train_batch(6, (dict_batches(toy_counts(), 30, shuffle=True), dict_batches(toy_counts(30, seed=1), 30, shuffle=False)),
                  call_func=call_func)
    assert t.n_skipped_steps == 4 and t.n_rollbacks == 1
    assert t.optimizer.param_groups[0]["lr"] == lr0 / 2
    assert len(t.history) == 6
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_persistent_nan_stops_naming_the_term_and_keeps_best_finite():
    call_func, ref = _nan_at(set(range(9, 1000)))
    t = Trainer(ToyVAE(), seed=0, verbose=False, max_bad_steps=3, on_nonfinite="stop")
    ref.append(t)
    t.init_optimizer(lr=1e-2)
    with pytest.raises(NonFiniteError, match="kl_loss"):
        t.train_batch(10, (dict_batches(toy_counts(), 30, shuffle=True), None),
                      call_func=call_func)
    assert "kl_loss" in t.stop_reason and "non-finite" in t.stop_reason
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert all(torch.isfinite(v).all() for v in t.fit_loop.best["state"].values())


def _run(*args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def _weights(path):
    with open(path) as fh:
        data = json.load(fh)
    return data


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not available")
def test_torchrun_two_processes_agree_and_only_rank0_writes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # one process with the global batch of two processes of 16 cells each
    single = _run("--epochs", "12", "--batch-size", "32", "--out", str(tmp_path / "single.json"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun_run(name, *extra):
        res = subprocess.run(
            [torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), "--epochs", "12",
             "--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / f"{name}.json"),
             *extra], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return _weights(tmp_path / f"{name}.json"), _weights(tmp_path / f"{name}.json.rank1")

    r0, r1 = torchrun_run("diverging", "--diverging-rank", "1")
    assert r0["world"] == 2
    assert r0["epochs"] == r1["epochs"]  # both ranks stop at the same epoch
    assert r0["val_recon"] == r1["val_recon"]  # from the same, all-reduced, values
    assert r0["weights"] == r1["weights"]  # replicas stay identical
    assert r0["writes"] and not r1["writes"]  # only rank 0 writes checkpoints
    # rank 1's own validation rises every epoch (alone it would stop after epoch 3);
    # the all-reduced mean keeps improving, so both ranks train on
    assert r0["epochs"] > 4

    c0, c1 = torchrun_run("clean")
    one = _weights(tmp_path / "single.json")
    assert c0["weights"] == c1["weights"]
    assert min(c0["val_recon"]) < 1.1 * min(one["val_recon"])
    assert math.isfinite(c0["val_recon"][-1])
