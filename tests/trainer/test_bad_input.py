"""Every bad input to the Trainer's public API fails with a clear error before training."""

from __future__ import annotations

import pytest
import torch

from step.functionality.comps.trainer import Trainer, category_random_split

from ._toy import ToyVAE, dict_batches, toy_counts


def _loaders():
    return (dict_batches(toy_counts(), 32, shuffle=True), None)


def _untouched(t, before):
    return all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stop_rule": "gate_loss"}, KeyError, "gate_loss"),
        ({"early_stopping": {"cl_loss": (5, 0.1)}}, KeyError, "cl_loss"),
        ({"loss_weights": {"contrast_loss": 2.0}}, KeyError, "contrast_loss"),
    ],
)
def test_unknown_terms_fail_before_the_first_update(kwargs, error, match):
    t = Trainer(ToyVAE(), verbose=False, **kwargs)
    t.init_optimizer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(error, match=match):
        t.train_batch(3, _loaders())
    assert _untouched(t, before) and t.global_step == 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.init_optimizer(lr=0), ValueError, "lr"),
        (lambda t: t.init_optimizer(lr=-1e-3), ValueError, "lr"),
        (lambda t: t.init_optimizer(tune_lr=0, stage=2), ValueError, "smoother"),
        (lambda t: t.set_lr_scheduler(kind="cosine"), ValueError, "kind"),
        (lambda t: t.train_batch(0, _loaders()), ValueError, "epochs"),
        (lambda t: t.train_batch(1, (1, 2, 3)), ValueError, "loaders"),
        (lambda t: t.train_batch(1, ([{"y": torch.ones(2, 20)}], None)), KeyError, "'x'"),
        (lambda t: t.train_batch(1, ([42], None)), TypeError, "dicts of tensors"),
        (lambda t: t.update_model_params({"recon_loss": 3.0}), ValueError, "no tensor"),
        (lambda t: t.update_model_params({"recon_loss": torch.ones(3, requires_grad=True)}),
         ValueError, "scalar"),
        (lambda t: t.train_graph_batch(1, [object()], list(range(4))), TypeError, "graph_loss|node_index"),
    ],
)
def test_trainer_api_errors(call, error, match):
    t = Trainer(ToyVAE(), verbose=False)
    t.init_optimizer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(t)
    assert _untouched(t, before)


def test_constructor_errors():
    with pytest.raises(TypeError, match="Module"):
        Trainer("not a model")
    with pytest.raises(ValueError, match="amp"):
        Trainer(ToyVAE(), amp="int8")
    with pytest.raises(ValueError, match="on_nonfinite"):
        Trainer(ToyVAE(), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="stop rule"):
        Trainer(ToyVAE(), stop_rule="")


def test_split_errors(pbmc_counts):
    from step.utils.dataset import ScDataset

    pbmc_counts.obs["lonely"] = ["a"] * 699 + ["b"]
    ds = ScDataset(pbmc_counts)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        category_random_split(ds, 1.0)
    with pytest.raises(ValueError, match="single member"):
        Trainer.make_loaders(ds, 32, obs_key="lonely")


def test_checkpoint_metadata_and_version_are_checked(tmp_path, monkeypatch):
    genes = [f"g{i}" for i in range(20)]
    t = Trainer(ToyVAE(), verbose=False, metadata={"genes": genes})
    t.init_optimizer()
    t.save_checkpoint(tmp_path / "c.pt")
    other = Trainer(ToyVAE(), verbose=False, metadata={"genes": genes[:-1] + ["CD3E"]})
    with pytest.raises(ValueError, match="genes.*CD3E"):
        other.load_checkpoint(tmp_path / "c.pt")
    import step

    monkeypatch.setattr(step, "__version__", "9.0.0")
    with pytest.raises(ValueError, match="written by step 0.2"):
        Trainer(ToyVAE(), verbose=False).load_checkpoint(tmp_path / "c.pt")
