"""Stage-1/2 parameter groups, frozen parts, and learning rates of each group."""

from __future__ import annotations

import pytest
import torch

from step.functionality.comps.trainer import Trainer
from step.functionality.comps.trainer._optim import default_milestones, kl_warmup_factor

from ._toy import ToyVAE, toy_counts


def _group_ids(opt):
    return {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}


@pytest.mark.parametrize("n_batches", [1, 3])
@pytest.mark.parametrize("tune_batch_embedding", [True, False])
def test_stage2_groups_cover_every_trainable_parameter_once(n_batches, tune_batch_embedding):
    model = ToyVAE(n_batches=n_batches)
    model.attach_smoother()
    t = Trainer(model, verbose=False)
    opt = t.init_optimizer(lr=1e-3, tune_lr=1e-5, stage=2, tune_batch_embedding=tune_batch_embedding)
    groups = _group_ids(opt)
    all_ids = [i for ids in groups.values() for i in ids]
    assert len(all_ids) == len(set(all_ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == 1e-3 and lrs["backbone"] == 1e-5
    assert {id(p) for p in model.smoother.parameters()} <= groups["head"]
    backbone = [model.moduler, model.expand, model.transformer, model.readout, model.decoder]
    assert {id(p) for m in backbone for p in m.parameters()} | {id(model.cls_token)} == groups["backbone"]
    if n_batches > 1 and tune_batch_embedding:
        assert lrs["batch"] == 1e-5
        assert all(p.requires_grad for p in model.batch_embedding.parameters())
    else:
        assert "batch" not in groups
        if n_batches > 1:
            assert not any(p.requires_grad for p in model.batch_embedding.parameters())
    # going back to stage 1 unfreezes what stage 2 froze
    t.init_optimizer(stage=1)
    assert all(p.requires_grad for p in model.parameters())


def test_stage2_needs_a_head():
    t = Trainer(ToyVAE(), verbose=False)
    with pytest.raises(ValueError, match="smoother"):
        t.init_optimizer(stage=2)


@pytest.mark.parametrize("kwargs", [{"lr": 0}, {"lr": -1}, {"tune_lr": 0}, {"stage": 3}])
def test_bad_optimizer_arguments(kwargs):
    model = ToyVAE()
    model.attach_smoother()
    with pytest.raises(ValueError):
        Trainer(model, verbose=False).init_optimizer(**{"stage": 2, **kwargs})


def test_staged_run_moves_backbone_slower_than_smoother():
    torch.manual_seed(0)
    model = ToyVAE(dropout=0.0)
    model.attach_smoother()
    t = Trainer(model, verbose=False, early_stopping=False)
    t.init_optimizer(lr=1e-2, tune_lr=1e-4, stage=2)
    t.set_lr_scheduler(kind="constant")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = toy_counts(32)
    src = torch.arange(32)
    edge_index = torch.stack([torch.cat([src, src]), torch.cat([src, (src + 1) % 32])])

    class G:
        pass

    g = G()
    g.node_index, g.edge_index = torch.arange(32), edge_index
    data = {"x": x, "library": x.sum(1)}

    class DS:
        def __len__(self):
            return 32

        def __getitem__(self, idx):
            return {k: v[idx] for k, v in data.items()}

    t.train_graph_batch(5, [g], DS())

    def mean_change(prefix):
        deltas = [(p.detach() - before[n]).abs().mean() for n, p in model.named_parameters()
                  if n.startswith(prefix)]
        return float(torch.stack(deltas).mean())

    smoother, backbone = mean_change("smoother"), mean_change("transformer")
    assert backbone > 0  # the backbone does learn in stage 2 ...
    assert smoother > 20 * backbone  # ... but at the slower tune_lr
    h = t.history
    assert (h["lr_head"] == 1e-2).all() and (h["lr_backbone"] == 1e-4).all()
    assert (h["stage"] == 2).all()


@pytest.mark.parametrize(("epoch", "warmup", "factor"),
                         [(0, 0, 1.0), (0, 4, 0.25), (1, 4, 0.5), (3, 4, 1.0), (10, 4, 1.0)])
def test_kl_warmup_factor(epoch, warmup, factor):
    assert kl_warmup_factor(epoch, warmup) == factor


@pytest.mark.parametrize(("epochs", "milestones"), [(1, []), (2, [1]), (8, [4, 6]), (100, [50, 75])])
def test_default_milestones(epochs, milestones):
    assert default_milestones(epochs) == milestones


def test_kl_warmup_reaches_the_model():
    seen = []

    class Spy(ToyVAE):
        def loss(self, inputs, *, kl_weight=None):
            if self.training:
                seen.append(kl_weight)
            return super().loss(inputs, kl_weight=kl_weight)

    t = Trainer(Spy(), verbose=False, kl_warmup_epochs=2)
    t.init_optimizer()
    t.train_batch(3, ([{"x": toy_counts(4), "library": torch.ones(4)}], None))
    assert seen == [0.5, 1.0, 1.0]
    assert list(t.history["kl_weight"]) == [0.5, 1.0, 1.0]


def test_weight_decay_uses_decoupled_adamw():
    t = Trainer(ToyVAE(), verbose=False, weight_decay=0.1)
    opt = t.init_optimizer(lr=1e-2)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    p = t.model.decoder.weight
    before = p.detach().clone()
    p.grad = None
    # a zero loss leaves only the decay: weights shrink by lr * decay
    t.update_model_params({"recon_loss": 0.0 * sum(q.sum() for q in t.model.parameters())})
    torch.testing.assert_close(p.detach(), before * (1 - 1e-2 * 0.1))
