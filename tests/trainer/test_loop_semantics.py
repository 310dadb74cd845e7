"""What a loop means: one notion of best, comparable validation under KL warm-up, custom
schedules that survive a restart, and finished runs that stay finished."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step.functionality.comps.trainer import Trainer, seed_everything

from ._toy import ToyVAE, dict_batches, toy_counts


def _scripted_validation(trainer: Trainer, values: list[float]):
    """A loss whose validation total follows ``values`` epoch by epoch."""

    def call_func(inputs):
        out = trainer.model.loss(inputs)
        if not trainer.model.training:
            return {"recon_loss": out["recon_loss"] * 0 + values[trainer.epoch]}
        return {"recon_loss": out["recon_loss"]}

    return call_func


def test_restored_weights_are_those_of_the_epoch_the_stopper_calls_best():
    # epochs 1, 2 and 4 improve on the best, but by less than delta: they are not progress
    values = [10.0, 9.999, 9.998, 5.0, 4.9999, 4.9998]
    t = Trainer(ToyVAE(), seed=0, verbose=False, stop_rule="total_loss",
                early_stopping={"total_loss": (10, 0.01), "recon_loss": None})
    t.init_optimizer(lr=1e-2)
    snapshots = {}

    class Keep:
        def on_train_epoch_end(self, trainer, epoch):
            snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    t.callbacks.append(Keep())
    x = toy_counts(60)
    t.train(len(values), x, np.arange(40), np.arange(40, 60),
            call_func=_scripted_validation(t, values))
    assert t.history["best"].tolist() == [True, False, False, True, False, False]
    assert t.early_stopping["total_loss"].best_epoch == 3
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snapshots[3][k]), k


def test_validation_uses_the_full_kl_weight_during_warm_up():
    seed_everything(0)
    x = toy_counts(120)
    valid = dict_batches(x[90:], 30, shuffle=False)
    t = Trainer(ToyVAE(), seed=0, verbose=False, kl_warmup_epochs=10)
    t.init_optimizer(lr=1e-2)
    expected = []

    class FullKL:
        def on_validation_end(self, trainer):
            trainer.model.eval()
            with torch.no_grad():
                kl = [trainer.model.loss(b)["kl_loss"] * len(b["x"]) for b in valid]
            trainer.model.train()
            expected.append(float(sum(kl)) / 30)

    t.callbacks.append(FullKL())
    t.train_batch(3, (dict_batches(x[:90], 30, shuffle=True), valid))
    h = t.history
    assert h["kl_weight"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert h["val_kl_loss"].tolist() == pytest.approx(expected, rel=1e-5)
    # the training means are taken at the warm-up weight, validation at the full one
    assert (h["kl_loss"] < h["val_kl_loss"]).all()


def _custom_run(tmp_path, epochs, *, stop_after=None, resume=None, scheduler_first=True):
    seed_everything(1)
    x = toy_counts(120)
    loaders = (dict_batches(x[:90], 16, shuffle=True), dict_batches(x[90:], 30, shuffle=False))
    t = Trainer(ToyVAE(dropout=0.2), seed=1, verbose=False, restore_best=False,
                checkpoint_path=tmp_path / "c.pt", checkpoint_every=1)
    t.init_optimizer(lr=1e-2)

    def attach():
        # a fresh instance would restart its epoch count and miss the milestone
        t.set_lr_scheduler(lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [4], 0.5))

    if scheduler_first:
        attach()
    if resume:
        t.load_checkpoint(resume)
    if not scheduler_first:
        attach()
    t.train_batch(stop_after or epochs, loaders)
    return t


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_a_custom_scheduler_is_restored(tmp_path, scheduler_first):
    full = _custom_run(tmp_path / "a", 6)
    (tmp_path / "b").mkdir()
    part = _custom_run(tmp_path / "b", 6, stop_after=3)
    assert part.history["lr_all"].tolist() == pytest.approx([1e-2] * 3)
    (tmp_path / "b" / "c.pt").rename(tmp_path / "b" / "at3.pt")
    # the 3-epoch call finished; the resumed call asks for 6 epochs and continues
    resumed = _custom_run(tmp_path / "b", 6, resume=tmp_path / "b" / "at3.pt",
                          scheduler_first=scheduler_first)
    assert resumed.history["lr_all"].tolist() == full.history["lr_all"].tolist()
    assert full.history["lr_all"].tolist() == pytest.approx([1e-2] * 4 + [5e-3] * 2)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_an_early_stopped_run_stays_stopped(tmp_path):
    x = toy_counts(60)

    def make():
        t = Trainer(ToyVAE(), seed=0, verbose=False, stop_rule="total_loss",
                    early_stopping={"total_loss": (2, 1e6)}, checkpoint_path=tmp_path / "c.pt")
        t.init_optimizer(lr=1e-2)
        return t

    t = make()
    assert t.train(20, x, np.arange(40), np.arange(40, 60)) is True
    assert len(t.history) == 3 and "early stop" in t.stop_reason
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    said = []
    again = make()
    again.trace_func, again.verbose = said.append, True
    again.load_checkpoint(tmp_path / "c.pt")
    assert again.train(20, x, np.arange(40), np.arange(40, 60)) is True
    assert len(again.history) == 3 and again.global_step == t.global_step
    assert any("already finished" in m and "early stop" in m for m in said)
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_steps_per_epoch_bounds_epochs_and_resumes_exactly(tmp_path):
    x = toy_counts(160)

    def run(epochs, resume=None, stop_after=None):
        seed_everything(2)
        t = Trainer(ToyVAE(dropout=0.2), seed=2, verbose=False, restore_best=False,
                    checkpoint_path=tmp_path / f"{stop_after}.pt", checkpoint_every=1)
        t.init_optimizer(lr=1e-2)
        t.set_lr_scheduler(milestones=[3])
        loaders = (dict_batches(x[:128], 8, shuffle=True, seed=2),
                   dict_batches(x[128:], 32, shuffle=False))
        seen = []
        t.callbacks.append(type("Seen", (), {"on_train_batch_end": lambda self, batch:
                                             seen.append(batch.n_obs)})())
        if resume:
            t.load_checkpoint(resume)
        t.train_batch(stop_after or epochs, loaders, steps_per_epoch=3)
        return t, seen

    full, seen = run(5)
    assert full.global_step == 15 and len(full.history) == 5 and len(seen) == 15
    part, _ = run(5, stop_after=2)
    resumed, _ = run(5, resume=tmp_path / "2.pt")
    assert resumed.global_step == 15
    def rows(t):
        return t.history.drop(columns="seconds").to_dict("records")

    assert rows(resumed) == rows(full)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="steps_per_epoch"):
        full.train_batch(1, full_loaders := (dict_batches(x, 8, shuffle=False), None),
                         steps_per_epoch=0)
    del full_loaders
