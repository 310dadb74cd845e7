import math

import pytest

from step.functionality.comps.trainer import EarlyStopping
from step.functionality.comps.trainer._early_stopping import StopRule, stop_defaults


@pytest.mark.parametrize(
    ("values", "patience", "delta", "stop_at"),
    [
        ([5, 4, 3, 3, 3, 3], 3, 0.0, 5),  # a flat plateau is not progress
        ([5, 4, 3.995, 3.99, 3.985], 2, 0.01, 3),  # steps smaller than delta do not count
        ([5, 4, 3, 2, 1, 0], 2, 0.0, None),
        ([1, math.nan, math.inf, 2], 3, 0.0, 3),  # non-finite values never improve
        ([3, 4, 2, 5, 6], 2, 0.0, 4),
    ],
)
def test_stops_at_exact_epoch(values, patience, delta, stop_at):
    es = EarlyStopping(patience=patience, delta=delta)
    stopped = None
    for epoch, v in enumerate(values):
        es.step(v, epoch)
        if es.early_stop:
            stopped = epoch
            break
    assert stopped == stop_at


def test_best_and_state_round_trip():
    es = EarlyStopping(patience=4, delta=0.1, name="recon_loss")
    for epoch, v in enumerate([3.0, 2.0, 1.95, 2.5]):
        es.step(v, epoch)
    assert es.best_score == 2.0 and es.best_epoch == 1 and es.counter == 2
    other = EarlyStopping()
    other.load_state_dict(es.state_dict())
    assert (other.best_score, other.best_epoch, other.counter, other.patience, other.delta) == (
        2.0, 1, 2, 4, 0.1)


def test_call_saves_best_weights(tmp_path):
    import torch

    model = torch.nn.Linear(2, 1)
    path = tmp_path / "best.pt"
    es = EarlyStopping(patience=2, path=path)
    es(1.0, model)
    torch.nn.init.zeros_(model.weight)
    es(2.0, model)  # worse: the file keeps the first weights
    saved = torch.load(path, weights_only=True)
    assert not torch.equal(saved["weight"], model.weight.detach())


def test_defaults_per_term():
    assert (stop_defaults("recon_loss").patience, stop_defaults("recon_loss").delta) == (30, 1e-2)
    assert (stop_defaults("val_kl_loss").patience, stop_defaults("kl_loss").delta) == (10, 1e-3)
    assert (stop_defaults("cl_loss").patience, stop_defaults("cl_loss").delta) == (20, 1e-4)
    assert (stop_defaults("gate_loss").patience, stop_defaults("gate_loss").delta) == (15, 1e-3)
    assert (stop_defaults("contrast_loss").patience, stop_defaults("x").delta) == (15, 1e-3)


def _exhausted(name, done):
    es = EarlyStopping(patience=1, name=name)
    es.step(1.0)
    if done:
        es.step(1.0)
    return es


def test_stop_rules():
    stoppers = {"recon_loss": _exhausted("recon_loss", True), "kl_loss": _exhausted("kl_loss", False)}
    assert StopRule("all").decide(stoppers) == (False, ["recon_loss"])
    assert StopRule("any").decide(stoppers) == (True, ["recon_loss"])
    assert StopRule("recon_loss").decide(stoppers) == (True, ["recon_loss"])
    assert StopRule("val_kl_loss").decide(stoppers) == (False, [])
    for rule in ("all", "any", "recon_loss"):
        assert StopRule(rule).decide({}) == (False, [])  # no stoppers never means stop


def test_unknown_monitor_lists_terms():
    with pytest.raises(KeyError, match="available terms"):
        StopRule("gate_loss").validate({"recon_loss", "kl_loss"})


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"delta": -1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)
