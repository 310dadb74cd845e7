"""Trainer mechanics on a small stand-in model: optimisation, stopping, schedules, safety."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from step.functionality.comps.trainer import (
    Batch,
    BatchSource,
    Trainer,
    seed_everything,
    train_loop_formatter,
)

from ._toy import ToyVAE, dict_batches, toy_counts

SPEC_MEMBERS = [
    "init_optimizer", "set_lr_scheduler", "update_model_params", "setup_early_stopping",
    "check_early_stop", "cum_loss", "format_loss_dict", "train", "train_batch",
    "train_graph_batch", "train_node_sampler", "validate_loader", "validate_X",
    "validate_gloader", "make_loaders", "handle_input_tuple", "handle_ginput_tuple",
    "save_checkpoint", "load_checkpoint", "predict", "mode_switch_to_train",
]


def test_spec_members_exist():
    for name in SPEC_MEMBERS:
        assert callable(getattr(Trainer, name)), name
    assert isinstance(Trainer.__dict__["make_loaders"], staticmethod)


def _trainer(model=None, **kw):
    kw.setdefault("verbose", False)
    t = Trainer(model or ToyVAE(), seed=0, **kw)
    t.init_optimizer(lr=1e-2)
    return t


def test_train_batch_lowers_loss_and_records_history():
    x = toy_counts()
    t = _trainer()
    t.set_lr_scheduler(kind="constant")
    t.train_batch(15, (dict_batches(x[:90], 16, shuffle=True), dict_batches(x[90:], 32, shuffle=False)))
    h = t.history
    assert len(h) == 15
    assert {"recon_loss", "kl_loss", "total_loss", "val_recon_loss", "val_kl_loss",
            "lr_all", "stage", "seconds", "best", "loop"} <= set(h.columns)
    assert h["val_recon_loss"].iloc[-1] < 0.5 * h["val_recon_loss"].iloc[0]
    assert (h["seconds"] > 0).all()


def test_full_batch_train_with_indices():
    x = toy_counts()
    t = _trainer()
    t.train(30, x, train_ind=np.arange(90), valid_ind=np.arange(90, 120))
    h = t.history
    assert h["val_recon_loss"].iloc[-1] < h["val_recon_loss"].iloc[0]
    assert len(h) == 30


def test_epochs_one_sets_up_stoppers_and_reports_one_epoch():
    t = _trainer()
    stopped = t.train_batch(1, (dict_batches(toy_counts(), 32, shuffle=True), None))
    assert stopped is False
    assert list(t.history["epoch"]) == [0]
    assert set(t.early_stopping) == {"recon_loss", "kl_loss", "total_loss"}


def test_bad_epochs_and_missing_optimizer():
    t = Trainer(ToyVAE(), verbose=False)
    loaders = (dict_batches(toy_counts(), 32, shuffle=True), None)
    with pytest.raises(RuntimeError, match="init_optimizer"):
        t.train_batch(2, loaders)
    t.init_optimizer()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="epochs"):
            t.train_batch(bad, loaders)


def test_running_means_hold_no_graph():
    model = ToyVAE()
    out = model.loss({"x": toy_counts(8), "library": torch.ones(8)})
    acc = Trainer.cum_loss(out, None, 8)
    Trainer.cum_loss(out, acc, 8)
    assert all(v.grad_fn is None and not v.requires_grad for v in acc.sums.values())
    means = acc.means()
    assert math.isclose(means["recon_loss"], out["recon_loss"].item(), rel_tol=1e-6)


def test_early_stop_restores_best_validation_weights():
    """Training pulls w to 5; validation prefers w = 2: the best epoch's w comes back."""

    class OneParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def loss(self, inputs):
            target = 5.0 if self.training else 2.0
            return {"recon_loss": (self.w - target) ** 2 + 0 * inputs["x"].sum()}

    seen = {}

    class Snapshot:
        def on_train_epoch_end(self, trainer, epoch):
            seen[epoch] = trainer.model.w.item()

    model = OneParam()
    t = Trainer(model, verbose=False, early_stopping={"recon_loss": (3, 0.0)},
                stop_rule="recon_loss", callbacks=[Snapshot()])
    t.init_optimizer(lr=0.3)
    t.set_lr_scheduler(kind="constant")
    x = torch.ones(4, 3)
    stopped = t.train_batch(200, ([{"x": x}], [{"x": x}]))
    h = t.history
    assert stopped and len(h) < 200
    best_epoch = int(h.loc[h["val_recon_loss"].idxmin(), "epoch"])
    assert h["best"].iloc[best_epoch]
    assert model.w.item() == pytest.approx(seen[best_epoch])
    assert abs(model.w.item() - 2.0) < abs(seen[max(seen)] - 2.0)
    assert "recon_loss" in t.stop_reason and f"after epoch {len(h) - 1}" in t.stop_reason


def test_rule_all_needs_every_term_while_any_needs_one():
    def run(rule):
        calls = {"n": 0}

        def call_func(inputs):
            calls["n"] += 1
            w = next(t.model.parameters())
            # recon flat from the start, kl keeps improving
            return {"recon_loss": 0 * w.sum() + 1.0, "kl_loss": 0 * w.sum() + 1.0 / calls["n"]}

        t = Trainer(ToyVAE(), verbose=False, stop_rule=rule, restore_best=False,
                    early_stopping={"recon_loss": (2, 0.0), "kl_loss": (2, 0.0), "total_loss": None})
        t.init_optimizer()
        t.train_batch(12, ([{"x": toy_counts(4)}], None), call_func=call_func)
        return len(t.history)

    assert run("any") == 3
    assert run("all") == 12


def test_multistep_changes_lr_at_milestones():
    t = _trainer()
    t.set_lr_scheduler(milestones=[3, 5], gamma=0.1)
    t.train_batch(7, (dict_batches(toy_counts(), 64, shuffle=True), None))
    lrs = t.history["lr_all"].to_numpy()
    np.testing.assert_allclose(lrs, [1e-2] * 3 + [1e-3] * 2 + [1e-4] * 2, rtol=1e-9)


def test_default_schedule_and_plateau():
    t = _trainer()
    t.train_batch(8, (dict_batches(toy_counts(), 64, shuffle=True), None))
    assert t.history["lr_all"].iloc[0] == 1e-2 and t.history["lr_all"].iloc[-1] < 1e-2
    t2 = _trainer()
    t2.set_lr_scheduler(kind="plateau", monitor="recon_loss", patience=0, factor=0.5)
    calls = {"n": 0}

    def flat(inputs):
        w = next(t2.model.parameters())
        return {"recon_loss": 0 * w.sum() + 1.0}

    t2.train_batch(3, ([{"x": toy_counts(4)}], None), call_func=flat)
    assert list(t2.history["lr_all"]) == [1e-2, 1e-2, 5e-3]


def test_nonfinite_loss_never_reaches_weights():
    t = _trainer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    w = next(t.model.parameters())
    t.update_model_params({"recon_loss": w.sum() * float("nan")})
    assert t.n_skipped_steps == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    t.guard.max_bad_steps = 2
    with pytest.raises(FloatingPointError, match="recon_loss"):
        t.update_model_params({"recon_loss": w.sum() * float("inf"), "kl_loss": w.sum()})


def test_loss_dict_without_tensor_is_an_error():
    t = _trainer()
    with pytest.raises(ValueError, match="no tensor"):
        t.update_model_params({"recon_loss": 1.0})


def test_gradient_clipping_bounds_the_norm():
    t = _trainer(grad_clip=1e-3)
    out = t.model.loss({"x": toy_counts(16), "library": torch.ones(16)})
    t.update_model_params(out)
    norm = torch.nn.utils.get_total_norm([p.grad for p in t.model.parameters() if p.grad is not None])
    assert float(norm) <= 1e-3 * 1.0001


def test_same_seed_same_weights():
    def run():
        seed_everything(3)  # the model's initial weights come from the seeded RNG too
        t = Trainer(ToyVAE(), seed=3, verbose=False)
        t.init_optimizer(lr=1e-2)
        t.train_batch(3, (dict_batches(toy_counts(), 16, shuffle=True), None))
        return t.model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_trains_on_cpu():
    t = _trainer(amp="bf16")
    t.train_batch(3, (dict_batches(toy_counts(), 32, shuffle=True), None))
    assert np.isfinite(t.history["recon_loss"]).all()
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(ToyVAE(), amp="fp16")


def test_callbacks_receive_only_what_they_ask_for():
    events = []

    class Recorder:
        def on_train_start(self, loop):
            events.append(("start", loop))

        def on_train_batch_end(self, step):
            events.append(("step", step))

        def on_train_epoch_end(self, epoch, logs):
            events.append(("epoch", epoch, "recon_loss" in logs))

    t = _trainer(callbacks=[Recorder()])
    t.train_batch(2, ([{"x": toy_counts(4), "library": torch.ones(4)}] * 2, None))
    assert events == [("start", "train_batch"), ("step", 1), ("step", 2), ("epoch", 0, True),
                      ("step", 3), ("step", 4), ("epoch", 1, True)]


def test_callback_can_request_stop():
    class StopAtTwo:
        def on_train_epoch_end(self, trainer, epoch):
            if epoch == 2:
                trainer.request_stop("enough")

    t = _trainer(callbacks=[StopAtTwo()])
    assert t.train_batch(10, (dict_batches(toy_counts(), 64, shuffle=True), None))
    assert len(t.history) == 3 and "enough" in t.stop_reason


def test_loop_formatter_wraps_custom_batch_sources():
    class Twice(BatchSource):
        def __init__(self, data):
            super().__init__()
            self.data = data

        def batches(self):
            for _ in range(2):
                yield Batch(lambda: self.plan.loss(self.data), len(self.data["x"]))

    class MyTrainer(Trainer):
        @train_loop_formatter
        def train_twice(self, epochs: int, data: dict) -> BatchSource:
            """Two steps per epoch on the same batch."""
            return Twice(data)

    t = MyTrainer(ToyVAE(), verbose=False)
    t.init_optimizer()
    t.train_twice(4, {"x": toy_counts(8), "library": torch.ones(8)})
    assert len(t.history) == 4 and t.global_step == 8
    assert set(t.history["loop"]) == {"train_twice"}
    assert str(inspect.signature(MyTrainer.train_twice)) == (
        "(self, epochs: 'int', data: 'dict') -> 'bool'")


def test_help_shows_each_loop_s_real_signature():
    for name, first in (("train", "X"), ("train_batch", "loaders"),
                        ("train_graph_batch", "gloader"), ("train_node_sampler", "gloader")):
        params = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert params[:3] == ["self", "epochs", first], (name, params)
        assert "state" not in params


def test_wrong_loader_contents_are_rejected():
    t = _trainer()
    with pytest.raises(TypeError, match="dicts of tensors"):
        t.train_batch(1, (["not a batch"], None))
    with pytest.raises(KeyError, match="'x'"):
        t.train_batch(1, ([{"counts": toy_counts(4)}], None))


def test_tensorboard_writer(tmp_path):
    pytest.importorskip("tensorboard")
    t = _trainer(writer=tmp_path / "tb")
    t.train_batch(2, (dict_batches(toy_counts(), 64, shuffle=True), None))
    t.logger.writer.flush()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_predict_returns_the_mean_embedding_in_eval_mode():
    t = _trainer()
    x = toy_counts(10)
    emb = t.predict([{"x": x, "library": x.sum(1)}])
    t.model.eval()
    np.testing.assert_allclose(emb, t.model.encode({"x": x})[0].detach().numpy(), rtol=1e-6)
    assert t.model.training is False


def test_device_cache_gives_the_same_batches(pbmc_counts):
    from step.functionality.comps.trainer._device_cache import DeviceCachedLoader
    from step.functionality.comps.trainer.sources.base import set_loader_epoch
    from step.utils.dataset import ScDataset

    ds = ScDataset(pbmc_counts[:200].copy())
    train, _ = Trainer.make_loaders(ds, 32, seed=0)
    cached = DeviceCachedLoader(train, torch.device("cpu"))
    t = Trainer(ToyVAE(n_genes=ds.n_genes), verbose=False)
    for epoch in range(2):
        set_loader_epoch(train, epoch, seed=epoch)
        plain = list(train)
        set_loader_epoch(cached, epoch, seed=epoch)
        for a, b in zip(plain, cached, strict=True):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])
    with pytest.raises(ValueError, match="MiB"):
        DeviceCachedLoader(train, torch.device("cpu"), max_bytes=1000)
    t = Trainer(ToyVAE(n_genes=ds.n_genes), seed=0, verbose=False, cache_on_device=True)
    t.init_optimizer(lr=1e-2)
    t.train_batch(4, Trainer.make_loaders(ds, 32, seed=0))
    assert t.history["val_recon_loss"].iloc[-1] < t.history["val_recon_loss"].iloc[0]


def test_live_display_renders_every_term():
    from io import StringIO

    from rich.console import Console

    from step.functionality.comps.trainer._progress import LossDisplay

    buf = StringIO()
    display = LossDisplay("train_batch", 3, console=Console(file=buf, force_terminal=True, width=100))
    with display:
        display.start_steps(4)
        display.advance_steps(4)
        display.end_epoch({"recon_loss": 12.5, "kl_loss": 0.25}, {"val_recon_loss": 13.0}, {"recon_loss": 13.0})
    text = buf.getvalue()
    for token in ("train_batch", "recon_loss", "kl_loss", "12.5", "13", "0.25", "1/3"):
        assert token in text, token
