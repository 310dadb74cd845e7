"""Building blocks: tokenizer, readout, decoder, smoother, anchor classifier."""

from __future__ import annotations

import pytest
import torch

from step.models._blocks import (
    _NarrowHeadAttention,
    AnchorClassifier,
    CountDecoder,
    FastDropout,
    GCNSmoother,
    GeneModuleTokenizer,
    VariationalReadout,
    transformer_encoder,
)
from step.models._likelihoods import log_nb, log_poisson, log_zinb


def test_tokenizer_is_an_einsum_over_genes() -> None:
    torch.manual_seed(0)
    tok = GeneModuleTokenizer(n_genes=40, n_modules=5, module_dim=3)
    with torch.no_grad():
        tok.bias.normal_()
    x = torch.rand(7, 40)
    tokens = tok(x)
    assert tokens.shape == (7, 5, 3)
    assert tok.weight.shape == (40, 3, 5)
    ref = torch.einsum("ng,gdm->nmd", x, tok.weight) + tok.bias
    torch.testing.assert_close(tokens, ref)


def test_readout_variational_and_deterministic() -> None:
    h = torch.randn(6, 16)
    mu, logvar = VariationalReadout(16, 4)(h)
    assert mu.shape == logvar.shape == (6, 4)
    det = VariationalReadout(16, 4, variational=False)
    mu, logvar = det(h)
    assert mu.shape == (6, 4) and logvar is None
    assert det.logvar is None


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_decoder_rate_is_library_times_softmax(likelihood: str) -> None:
    torch.manual_seed(0)
    dec = CountDecoder(8, 30, hidden_dim=16, likelihood=likelihood)
    library = torch.tensor([1.0, 250.0, 4000.0])
    params = dec(torch.randn(3, 8), library)
    torch.testing.assert_close(params["log_mu"].exp().sum(-1), library)
    assert ("log_theta" in params) == (likelihood != "poisson")
    assert ("pi_logits" in params) == (likelihood == "zinb")
    x = torch.poisson(params["log_mu"].exp().detach())
    mu, lp = params["log_mu"].exp(), dec.log_prob(x, params)
    if likelihood == "poisson":
        ref = log_poisson(x, mu)
    elif likelihood == "nb":
        ref = log_nb(x, mu, params["log_theta"].exp())
    else:
        ref = log_zinb(x, mu, params["log_theta"].exp(), params["pi_logits"])
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-4)


def test_decoder_library_is_clamped_to_one() -> None:
    dec = CountDecoder(4, 10, hidden_dim=8)
    params = dec(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(params["log_mu"]).all()
    torch.testing.assert_close(params["log_mu"].exp().sum(-1), torch.ones(2))


def test_decoder_dispersion_per_gene_and_batch() -> None:
    dec = CountDecoder(4, 12, hidden_dim=8, dispersion="gene-batch", n_batches=3)
    assert dec.log_theta.shape == (3, 12)
    with torch.no_grad():
        dec.log_theta.copy_(torch.arange(3.0).unsqueeze(1).expand(3, 12))
    params = dec(torch.randn(4, 4), torch.full((4,), 100.0), torch.tensor([2, 0, 1, 2]))
    assert params["log_theta"].shape == (4, 12)
    torch.testing.assert_close(params["log_theta"][:, 0], torch.tensor([2.0, 0.0, 1.0, 2.0]))
    assert CountDecoder(4, 12, hidden_dim=8).log_theta.shape == (12,)
    assert CountDecoder(4, 12, hidden_dim=8, likelihood="poisson").log_theta is None


def test_decoder_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="likelihood"):
        CountDecoder(4, 12, likelihood="gaussian")
    with pytest.raises(ValueError, match="dispersion"):
        CountDecoder(4, 12, dispersion="cell")


def _ring(n: int) -> torch.Tensor:
    """Symmetric ring graph with exactly one self-loop per node."""
    i = torch.arange(n)
    src = torch.cat([i, i, i])
    dst = torch.cat([i, (i + 1) % n, (i - 1) % n])
    return torch.stack([src, dst])


def test_smoother_starts_as_identity_with_residual() -> None:
    torch.manual_seed(0)
    sm = GCNSmoother(8, n_layers=2, residual=True).eval()
    h = torch.randn(10, 8)
    torch.testing.assert_close(sm(h, _ring(10)), h)
    assert sm.project(h).shape == (10, 8)


def test_smoother_uses_the_graph_self_loops_without_adding_more() -> None:
    torch.manual_seed(0)
    sm = GCNSmoother(4, n_layers=1, dropout=0.0).eval()
    conv = sm.convs[0]
    h = torch.randn(6, 4)
    # Every node of the ring has degree 3 (two neighbours and one self-loop),
    # so the symmetric normalisation averages the three rows.
    ei = _ring(6)
    agg = torch.zeros(6, 4).index_add_(0, ei[1], h[ei[0]]) / 3.0
    ref = agg @ conv.lin.weight.T + conv.bias
    torch.testing.assert_close(sm(h, ei), ref, rtol=1e-5, atol=1e-5)


def test_smoother_rejects_zero_layers() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        GCNSmoother(4, n_layers=0)


def test_anchor_classifier_logits_and_anchored_representation() -> None:
    torch.manual_seed(0)
    clf = AnchorClassifier(3, temperature=2.0, mix=0.25)
    mu = torch.randn(5, 3)
    anchors = torch.randn(4, 3)
    logits = clf(mu, anchors)
    ref = -torch.cdist(mu, anchors).square() / 2.0
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    expected = 0.75 * mu + 0.25 * torch.softmax(ref, -1) @ anchors
    torch.testing.assert_close(clf.anchored(mu, anchors), expected, rtol=1e-4, atol=1e-4)


def test_fast_dropout_matches_dropout_semantics() -> None:
    torch.manual_seed(0)
    drop = FastDropout(0.25)
    x = torch.ones(200_000)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="dropout"):
        FastDropout(1.0)


def test_fast_dropout_mask_has_independent_elements() -> None:
    # Four elements share one 64-bit draw: every position within a draw must be kept at
    # the same rate, and neighbours must not be correlated.
    torch.manual_seed(1)
    drop = FastDropout(0.1)
    x = torch.ones(4 * 100_001 + 3, requires_grad=True)
    out = drop(x)
    kept = (out != 0).float()
    by_position = kept[: 4 * 100_001].view(-1, 4).mean(0)
    assert torch.all((by_position - 0.9).abs() < 0.004), by_position
    centred = kept - kept.mean()
    corr = (centred[1:] * centred[:-1]).mean() / centred.square().mean()
    assert abs(corr.item()) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.01
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())
    torch.manual_seed(1)
    torch.testing.assert_close(drop(torch.ones_like(x)), out.detach())


def test_transformer_encoder_is_batch_first_pre_norm() -> None:
    enc = transformer_encoder(16, n_layers=2, n_heads=4, dropout=0.1)
    assert isinstance(enc, torch.nn.TransformerEncoder)
    assert len(enc.layers) == 2
    layer = enc.layers[0]
    assert layer.norm_first and layer.self_attn.batch_first
    assert enc(torch.randn(3, 9, 16)).shape == (3, 9, 16)


@pytest.mark.parametrize("heads", [1, 4, 8, 16])
def test_cpu_attention_matches_pytorch_attention(heads: int) -> None:
    """The encoder's matmul attention on CPUs gives the outputs and gradients of PyTorch's
    own attention with the same weights."""
    torch.manual_seed(0)
    ours = transformer_encoder(64, n_layers=2, n_heads=heads, dropout=0.0)
    reference = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(64, heads, 256, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True),
        num_layers=2, norm=torch.nn.LayerNorm(64), enable_nested_tensor=False)
    reference.load_state_dict(ours.state_dict())  # the same parameter names
    x = torch.randn(16, 33, 64, requires_grad=True)
    weights = torch.randn(16, 33, 64)
    results = []
    for enc in (ours, reference):
        out = enc(x)
        grads = torch.autograd.grad((out * weights).sum(), [x, *enc.parameters()])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # under bf16 autocast the attention weights are normalised in float32 (the narrow-head
    # function is for float32 only)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(x)
    torch.testing.assert_close(low.float(), results[1][0], rtol=0.1, atol=0.1)


def test_narrow_head_attention_gradients_are_exact() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 9, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    torch.autograd.gradcheck(lambda *t: _NarrowHeadAttention.apply(*t, 0.5), (q, k, v))
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.5, -1) @ v
    torch.testing.assert_close(_NarrowHeadAttention.apply(q, k, v, 0.5), expected)
