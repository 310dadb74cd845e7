"""Checkpoints: exact resume, atomic writes, and refusal of files that would run code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from step.functionality.comps.trainer import Trainer, seed_everything

from ._toy import ToyVAE, dict_batches, toy_counts


def _fresh(seed=7):
    seed_everything(seed)
    t = Trainer(ToyVAE(dropout=0.3), seed=seed, verbose=False)
    t.init_optimizer(lr=1e-2)
    t.set_lr_scheduler(milestones=[4], gamma=0.3)
    x = toy_counts()
    loaders = (dict_batches(x[:90], 16, shuffle=True), dict_batches(x[90:], 32, shuffle=False))
    return t, loaders


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full, loaders = _fresh()
    full.train_batch(7, loaders)

    first, loaders = _fresh()
    first.checkpoint_path, first.checkpoint_every = tmp_path / "run.pt", 1
    first.train_batch(3, loaders)  # "interrupted" after epoch 3 of 7
    # a new process: new model, new trainer, same seed and data
    resumed, loaders = _fresh(seed=7)
    torch.manual_seed(123)  # whatever happened in between must not matter
    resumed.load_checkpoint(tmp_path / "run.pt")
    assert resumed.epoch == 3
    resumed.train_batch(7, loaders)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = full.history, resumed.history
    assert list(ha["epoch"]) == list(hb["epoch"]) == list(range(7))
    assert ha["val_recon_loss"].tolist() == hb["val_recon_loss"].tolist()
    assert ha["lr_all"].tolist() == hb["lr_all"].tolist()


def test_checkpoint_holds_everything(tmp_path):
    t, loaders = _fresh()
    t.train_batch(2, loaders)
    t.save_checkpoint(tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "stoppers", "counters", "history", "rng", "best"):
        assert state[key] is not None, key
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["counters"]["epoch"] == 2 and state["counters"]["global_step"] == 2 * 6


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the crafted file
def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": 1, "model": _RunsCode(marker)}, fh)
    t, _ = _fresh()
    with pytest.raises(ValueError, match="refusing"):
        t.load_checkpoint(path)
    assert not marker.exists()


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t, loaders = _fresh()
    t.train_batch(1, loaders)
    path = tmp_path / "c.pt"
    t.save_checkpoint(path)
    good = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    other, _ = _fresh()
    other.load_checkpoint(path)
    assert other.epoch == 1


def test_checkpoint_of_another_model_is_refused(tmp_path):
    t, loaders = _fresh()
    t.save_checkpoint(tmp_path / "c.pt")
    other = Trainer(ToyVAE(n_genes=30), verbose=False)
    with pytest.raises(ValueError, match="n_genes"):
        other.load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(FileNotFoundError):
        other.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        other.load_checkpoint(tmp_path / "junk.pt")


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    def draws():
        return (random.random(), float(np.random.rand()), float(torch.rand(1)))

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)
    other = draws()
    assert all(a != b for a, b in zip(first, other))
