"""TranscriptFormer: shapes, sampling, losses, errors and configuration."""

from __future__ import annotations

import json

import pytest
import torch

from step._constants import LOSS_KEYS
from step.models import TranscriptFormer
from step.models._losses import gaussian_kl

N_GENES = 40
SMALL = dict(n_modules=4, module_dim=6, hidden_dim=16, n_layers=1, n_heads=2)


def _inputs(n: int = 12, *, n_batches: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, N_GENES, generator=g) * 6.0, generator=g)
    return {
        "x": x,
        "library": x.sum(1),
        "batch": torch.randint(0, n_batches, (n,), generator=g),
        "index": torch.arange(n),
    }


def _model(**kwargs) -> TranscriptFormer:
    torch.manual_seed(0)
    return TranscriptFormer(N_GENES, **{**SMALL, **kwargs})


def test_contract_attributes() -> None:
    model = _model()
    for name in ("moduler", "cls_token", "expand", "transformer", "readout", "decoder"):
        assert getattr(model, name) is not None
    assert isinstance(model.cls_token, torch.nn.Parameter)
    assert isinstance(model.transformer, torch.nn.TransformerEncoder)
    assert model.moduler.weight.shape == (N_GENES, 6, 4)
    for name in ("batch_embedding", "batch_readout", "smoother", "anchors", "classifier"):
        assert getattr(model, name) is None
    multi = _model(n_batches=3)
    assert multi.batch_embedding.num_embeddings == 3
    assert multi.batch_readout is not None


def test_shapes_of_encode_decode_and_forward() -> None:
    model = _model(latent_dim=5)
    inputs = _inputs()
    enc = model.encode(inputs["x"])
    assert enc["h"].shape == (12, 16)
    assert enc["mu"].shape == enc["logvar"].shape == (12, 5)
    params = model.decode(enc["mu"], inputs["library"])
    assert params["log_mu"].shape == params["pi_logits"].shape == (12, N_GENES)
    out = model(inputs)
    assert out["z"].shape == (12, 5)
    assert model.embed(inputs).shape == (12, 5)
    assert model.latent_dim == 5 and _model().latent_dim == 16


def test_encoder_sees_library_normalised_log_counts() -> None:
    model = _model()
    x = torch.tensor([[0.0, 5.0, 15.0] + [0.0] * (N_GENES - 3)])
    torch.testing.assert_close(
        model.normalise(x, torch.tensor([20.0])), torch.log1p(x / 20.0 * 1e4)
    )
    # Library defaults to the row sum and is clamped to at least one.
    torch.testing.assert_close(model.normalise(x), torch.log1p(x / 20.0 * 1e4))
    torch.testing.assert_close(model.normalise(x, torch.tensor([0.0])), torch.log1p(x * 1e4))
    raw = _model(library_log_input=False)
    torch.testing.assert_close(raw.normalise(x, torch.tensor([20.0])), torch.log1p(x))


def test_embed_is_the_mean_and_deterministic_in_eval() -> None:
    model = _model().eval()
    inputs = _inputs()
    first, second = model.embed(inputs), model.embed(inputs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, model.encode(inputs["x"], library=inputs["library"])["mu"])
    out = model(inputs)
    torch.testing.assert_close(out["z"], out["mu"])  # no sampling in eval mode


def test_training_mode_samples_z() -> None:
    model = _model(dropout=0.0).train()
    inputs = _inputs()
    out = model(inputs)
    assert not torch.allclose(out["z"], out["mu"])
    std = torch.exp(0.5 * out["logvar"])
    standardised = (out["z"] - out["mu"]) / std
    assert standardised.abs().max() < 7.0
    assert model.sample(out["mu"], out["logvar"]).shape == out["mu"].shape


def test_loss_terms_and_values() -> None:
    model = _model(dropout=0.0).eval()
    inputs = _inputs()
    losses = model.loss(inputs)
    assert set(losses) == {LOSS_KEYS.RECON, LOSS_KEYS.KL}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    enc = model.encode(inputs["x"], library=inputs["library"])
    params = model.decode(enc["mu"], inputs["library"])
    recon = -model.decoder.log_prob(inputs["x"], params).sum(-1).mean()
    torch.testing.assert_close(losses[LOSS_KEYS.RECON], recon)
    kl = gaussian_kl(enc["mu"], enc["logvar"]).sum(-1).mean()
    torch.testing.assert_close(losses[LOSS_KEYS.KL], kl)
    half = model.loss(inputs, kl_weight=0.5)[LOSS_KEYS.KL]
    torch.testing.assert_close(half, 0.5 * kl)


def test_kl_free_bits_floor_per_dimension() -> None:
    inputs = _inputs()
    floor = 50.0
    model = _model(dropout=0.0, free_bits=floor, kl_weight=2.0).eval()
    kl = model.loss(inputs)[LOSS_KEYS.KL]
    # Every dimension sits below a 50-nat floor, so the term is constant ...
    torch.testing.assert_close(kl, torch.tensor(2.0 * floor * model.latent_dim))
    kl.backward()
    # ... and gives the encoder no gradient.
    assert model.readout.logvar.weight.grad.abs().max() == 0
    assert model.readout.mu.weight.grad.abs().max() == 0

    small = _model(dropout=0.0, free_bits=1e-6).eval()
    plain = _model(dropout=0.0).eval()
    torch.testing.assert_close(small.loss(inputs)[LOSS_KEYS.KL], plain.loss(inputs)[LOSS_KEYS.KL])


def test_partial_free_bits_only_clamp_small_dimensions() -> None:
    model = _model(dropout=0.0).eval()
    inputs = _inputs()
    enc = model.encode(inputs["x"])
    per_dim = gaussian_kl(enc["mu"], enc["logvar"]).mean(0)
    floor = float(per_dim.median().detach())
    model.free_bits = floor
    expected = per_dim.clamp_min(floor).sum()
    torch.testing.assert_close(model.loss(inputs)[LOSS_KEYS.KL], expected)


def test_deterministic_model_has_no_kl_term() -> None:
    model = _model(variational=False)
    losses = model.loss(_inputs())
    assert set(losses) == {LOSS_KEYS.RECON}
    assert model.encode(_inputs()["x"]).keys() == {"h", "mu"}


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_every_likelihood_trains(likelihood: str) -> None:
    model = _model(likelihood=likelihood)
    losses = model.loss(_inputs())
    sum(losses.values()).backward()
    assert model.moduler.weight.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0


def test_batch_embedding_feeds_the_decoder_with_per_batch_dispersion() -> None:
    model = _model(n_batches=3, dispersion="gene-batch").eval()
    assert model.decoder.log_theta.shape == (3, N_GENES)
    inputs = _inputs(n_batches=3)
    losses = model.loss(inputs)
    sum(losses.values()).backward()
    assert model.batch_embedding.weight.grad.abs().sum() > 0
    assert model.decoder.log_theta.grad.shape == (3, N_GENES)
    z = torch.zeros(2, model.latent_dim)
    lib = torch.full((2,), 100.0)
    a = model.decode(z, lib, torch.tensor([0, 0]))["log_mu"]
    b = model.decode(z, lib, torch.tensor([0, 1]))["log_mu"]
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_missing_keys_raise_key_error_naming_the_key() -> None:
    model = _model()
    inputs = _inputs()
    for key in ("x", "library"):
        broken = {k: v for k, v in inputs.items() if k != key}
        with pytest.raises(KeyError, match=repr(key)):
            model.loss(broken)
    multi = _model(n_batches=2)
    with pytest.raises(KeyError, match="'batch'"):
        multi.loss({k: v for k, v in _inputs(n_batches=2).items() if k != "batch"})
    # library is optional for embedding
    assert model.embed({"x": inputs["x"]}).shape == (12, 16)


def test_bad_batch_codes_raise() -> None:
    model = _model(n_batches=3)
    inputs = _inputs(n_batches=3)
    inputs["batch"] = torch.tensor([0, 1, 2, 3] * 3)
    with pytest.raises(ValueError, match=r"batch codes must lie in \[0, 2\]"):
        model.loss(inputs)
    inputs["batch"] = torch.full((12,), -1)
    with pytest.raises(ValueError, match="batch"):
        model.loss(inputs)
    inputs["batch"] = torch.zeros(12)
    with pytest.raises(TypeError, match="integer"):
        model.loss(inputs)
    single = _model()
    bad = _inputs()
    bad["batch"] = torch.ones(12, dtype=torch.long)
    with pytest.raises(ValueError, match="batch"):
        single.loss(bad)
    with pytest.raises(ValueError, match="batch"):
        model.decode(torch.zeros(2, 16), torch.ones(2))


def test_wrong_gene_count_raises_value_error() -> None:
    model = _model()
    inputs = _inputs()
    inputs["x"] = inputs["x"][:, :-1]
    with pytest.raises(ValueError, match=f"\\(n_cells, {N_GENES}\\)"):
        model.loss(inputs)
    with pytest.raises(ValueError, match="n_genes|n_cells"):
        model.encode(torch.zeros(3, N_GENES + 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"likelihood": "gaussian"},
        {"dispersion": "cell"},
        {"hidden_dim": 15, "n_heads": 2},
        {"n_batches": 0},
        {"dropout": 1.0},
        {"free_bits": -1.0},
        {"contrast_temperature": 0.0},
    ],
)
def test_invalid_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        _model(**kwargs)


def test_config_round_trip_reproduces_outputs() -> None:
    model = _model(n_batches=2, dispersion="gene-batch", likelihood="nb", latent_dim=6)
    model.init_smoother_with_builtin(n_layers=1, dropout=0.2)
    model.init_anchors(3, temperature=0.5, mix=0.3)
    config = json.loads(json.dumps(model.config))
    assert config["smoother"]["n_layers"] == 1
    assert config["anchors"] == {"n_classes": 3, "temperature": 0.5, "mix": 0.3}

    rebuilt = TranscriptFormer.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    again = TranscriptFormer(**model.config)
    again.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config == again.config

    model.eval()
    rebuilt.eval()
    inputs = _inputs(n_batches=2)
    inputs["label"] = torch.arange(12) % 3
    torch.testing.assert_close(rebuilt.embed(inputs), model.embed(inputs))
    torch.testing.assert_close(rebuilt.anchored(inputs), model.anchored(inputs))
    a, b = model.loss(inputs), rebuilt.loss(inputs)
    assert a.keys() == b.keys() == {"recon_loss", "kl_loss", "cl_loss"}
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_config_is_a_copy() -> None:
    model = _model()
    config = model.config
    config["n_genes"] = 1
    assert model.config["n_genes"] == N_GENES
    with pytest.raises(KeyError, match="n_genes"):
        TranscriptFormer.from_config({"hidden_dim": 8})


def test_anchors_add_cl_loss_only_with_labels() -> None:
    model = _model()
    inputs = _inputs()
    assert LOSS_KEYS.CL not in model.loss({**inputs, "label": torch.zeros(12, dtype=torch.long)})
    model.init_anchors(4)
    assert model.anchors.shape == (4, 16) and model.n_classes == 4
    assert LOSS_KEYS.CL not in model.loss(inputs)
    labelled = {**inputs, "label": torch.arange(12) % 4}
    losses = model.loss(labelled)
    sum(losses.values()).backward()
    assert model.anchors.grad.abs().sum() > 0
    assert model.classifier.proj.weight.grad.abs().sum() > 0
    assert model.anchored(labelled).shape == (12, 16)


def test_cl_loss_is_cross_entropy_to_the_nearest_anchor() -> None:
    model = _model().eval()
    inputs = _inputs()
    mu = model.embed(inputs)
    model.init_anchors(2, temperature=3.0, init=torch.stack([mu[0], mu[1]]))
    label = torch.tensor([0, 1] + [-1] * 10)
    loss = model.loss({**inputs, "label": label})[LOSS_KEYS.CL]
    d = torch.cdist(mu[:2], mu[:2]).square()
    ref = torch.nn.functional.cross_entropy(-d / 3.0, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    none = model.loss({**inputs, "label": torch.full((12,), -1)})[LOSS_KEYS.CL]
    assert none == 0


def test_anchor_errors() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="init_anchors"):
        model.anchored(_inputs())
    model.init_anchors(3)
    with pytest.raises(ValueError, match="label"):
        model.loss({**_inputs(), "label": torch.full((12,), 3)})
    with pytest.raises(ValueError, match="shape"):
        model.init_anchors(3, init=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="temperature"):
        model.init_anchors(3, temperature=0.0)


GROUP_ATTRIBUTES = (
    "moduler",
    "cls_token",
    "expand",
    "transformer",
    "readout",
    "decoder",
    "batch_embedding",
    "batch_readout",
    "smoother",
    "anchors",
    "classifier",
)


def test_every_parameter_belongs_to_a_named_attribute() -> None:
    """Stage-2 optimisers group parameters by these attribute names."""
    model = _model(n_batches=2)
    model.init_smoother_with_builtin()
    model.init_anchors(3)
    by_attribute = set()
    for name in GROUP_ATTRIBUTES:
        part = getattr(model, name)
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        by_attribute.update(id(p) for p in params)
    assert by_attribute == {id(p) for p in model.parameters()}
    assert len(by_attribute) == len(list(model.parameters()))


def test_config_follows_mutable_loss_settings() -> None:
    model = _model()
    model.kl_weight = 0.25
    model.free_bits = 0.1
    config = model.config
    assert config["kl_weight"] == 0.25 and config["free_bits"] == 0.1
    assert TranscriptFormer(**config).kl_weight == 0.25


def test_bf16_autocast_gives_float32_losses_and_embeddings() -> None:
    model = _model(n_batches=2)
    model.init_anchors(3)
    inputs = {**_inputs(n_batches=2), "label": torch.arange(12) % 3}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(inputs)
        embedded = model.embed(inputs)
        anchored = model.anchored(inputs)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert embedded.dtype == anchored.dtype == torch.float32
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
