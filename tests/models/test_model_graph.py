"""Graph training of TranscriptFormer: smoother, graph_loss and embed_graph."""

from __future__ import annotations

import pytest
import torch

from step._constants import LOSS_KEYS
from step.models import TranscriptFormer, _losses

N_GENES = 30
SMALL = dict(n_modules=4, module_dim=6, hidden_dim=16, n_layers=1, n_heads=2)


def _grid_graph(side: int) -> torch.Tensor:
    """4-neighbour grid, symmetric, exactly one self-loop per node."""
    idx = torch.arange(side * side).view(side, side)
    pairs = [
        torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)]),
        torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)]),
    ]
    edges = torch.cat(pairs, dim=1)
    loops = torch.arange(side * side).repeat(2, 1)
    return torch.cat([edges, edges.flip(0), loops], dim=1)


def _inputs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, N_GENES, generator=g) * 5.0, generator=g)
    return {"x": x, "library": x.sum(1), "batch": torch.zeros(n, dtype=torch.long)}


def _model(**kwargs) -> TranscriptFormer:
    torch.manual_seed(0)
    model = TranscriptFormer(N_GENES, **{**SMALL, **kwargs})
    model.init_smoother_with_builtin(n_layers=2)
    return model


def test_graph_loss_terms() -> None:
    model = _model()
    inputs, ei = _inputs(36), _grid_graph(6)
    terms = model.graph_loss(inputs, ei)
    assert set(terms) == {LOSS_KEYS.RECON, LOSS_KEYS.KL, LOSS_KEYS.CONTRAST}
    terms = model.graph_loss(inputs, ei, end_to_end=True)
    assert set(terms) == {
        LOSS_KEYS.RECON,
        LOSS_KEYS.KL,
        LOSS_KEYS.CONTRAST,
        LOSS_KEYS.RAW_RECON,
    }
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    model.init_anchors(3)
    labelled = {**inputs, "label": torch.arange(36) % 3}
    assert LOSS_KEYS.CL in model.graph_loss(labelled, ei)


def test_graph_loss_gradients_reach_the_backbone() -> None:
    model = _model()
    terms = model.graph_loss(_inputs(36), _grid_graph(6), loss_mask=torch.arange(36) < 20)
    sum(terms.values()).backward()
    for name in ("moduler", "expand", "transformer", "readout", "decoder", "smoother"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert model.cls_token.grad.abs().sum() > 0
    attn = model.transformer.layers[0].self_attn.in_proj_weight
    assert attn.grad is not None and attn.grad.abs().sum() > 0


def test_each_term_alone_reaches_the_transformer() -> None:
    model = _model()
    inputs, ei = _inputs(36), _grid_graph(6)
    for key in (LOSS_KEYS.RECON, LOSS_KEYS.CONTRAST, LOSS_KEYS.RAW_RECON):
        model.zero_grad()
        model.graph_loss(inputs, ei, end_to_end=True)[key].backward()
        grad = model.transformer.layers[0].linear1.weight.grad
        assert grad is not None and grad.abs().sum() > 0, key


def test_loss_mask_selects_the_nodes_that_count() -> None:
    model = _model(dropout=0.0).eval()
    inputs, ei = _inputs(36), _grid_graph(6)
    mask = torch.zeros(36, dtype=torch.bool)
    mask[[0, 7, 20]] = True
    terms = model.graph_loss(inputs, ei, loss_mask=mask)
    mu = model.embed_graph(inputs, ei)[mask]
    params = model.decode(mu, inputs["library"][mask])
    recon = -model.decoder.log_prob(inputs["x"][mask], params).sum(-1).mean()
    torch.testing.assert_close(terms[LOSS_KEYS.RECON], recon)


def test_loss_mask_validation() -> None:
    model = _model()
    inputs, ei = _inputs(36), _grid_graph(6)
    with pytest.raises(ValueError, match="loss_mask"):
        model.graph_loss(inputs, ei, loss_mask=torch.ones(36))
    with pytest.raises(ValueError, match="no node"):
        model.graph_loss(inputs, ei, loss_mask=torch.zeros(36, dtype=torch.bool))
    with pytest.raises(ValueError, match="edge_index"):
        model.graph_loss(inputs, ei.T)


def test_contrast_uses_at_most_contrast_sample_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    original = _losses.info_nce

    def recording(a: torch.Tensor, b: torch.Tensor, *, temperature: float) -> torch.Tensor:
        seen.append((a.shape[0], b.shape[0]))
        return original(a, b, temperature=temperature)

    monkeypatch.setattr(_losses, "info_nce", recording)
    model = _model()
    inputs, ei = _inputs(100), _grid_graph(10)
    mask = torch.arange(100) % 2 == 0
    model.graph_loss(inputs, ei, loss_mask=mask, contrast_sample=16)
    model.graph_loss(inputs, ei, loss_mask=mask, contrast_sample=1024)
    model.graph_loss(inputs, ei, contrast_sample=7)
    assert seen == [(16, 16), (50, 50), (7, 7)]


def test_sample_rows() -> None:
    assert _losses.sample_rows(10, 20) is None
    picked = _losses.sample_rows(1000, 64)
    assert picked.shape == (64,) and picked.unique().numel() == 64
    assert int(picked.max()) < 1000
    with pytest.raises(ValueError, match="at least 1"):
        _losses.sample_rows(10, 0)


def test_info_nce_prefers_matching_rows() -> None:
    torch.manual_seed(0)
    a = torch.randn(32, 8)
    matched = _losses.info_nce(a, a + 0.01 * torch.randn(32, 8), temperature=0.1)
    shuffled = _losses.info_nce(a, a[torch.randperm(32)], temperature=0.1)
    assert matched < 0.1 < shuffled


def test_embed_graph_smoothed_and_raw() -> None:
    model = _model(dropout=0.0).eval()
    model.init_smoother_with_builtin(residual=True)
    inputs, ei = _inputs(36), _grid_graph(6)
    raw = model.embed_graph(inputs, ei, smoothed=False)
    torch.testing.assert_close(raw, model.embed(inputs))
    # A fresh residual smoother is the identity ...
    torch.testing.assert_close(model.embed_graph(inputs, ei), raw)
    with torch.no_grad():
        for p in model.smoother.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # ... and a trained one mixes neighbours.
    assert not torch.allclose(model.embed_graph(inputs, ei), raw)
    assert model.embed_graph(inputs, ei).shape == (36, 16)


def test_graph_methods_need_a_smoother() -> None:
    torch.manual_seed(0)
    model = TranscriptFormer(N_GENES, **SMALL)
    with pytest.raises(RuntimeError, match="init_smoother_with_builtin"):
        model.graph_loss(_inputs(36), _grid_graph(6))
    with pytest.raises(RuntimeError, match="init_smoother_with_builtin"):
        model.embed_graph(_inputs(36), _grid_graph(6))
    assert model.embed_graph(_inputs(36), _grid_graph(6), smoothed=False).shape == (36, 16)


def test_smoother_settings_in_config() -> None:
    model = _model()
    model.init_smoother_with_builtin(n_layers=3, hidden=8, dropout=0.0, residual=True)
    assert model.config["smoother"] == {
        "n_layers": 3,
        "hidden": 8,
        "dropout": 0.0,
        "residual": True,
        "proj_dim": None,
    }
    rebuilt = TranscriptFormer.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert len(rebuilt.smoother.convs) == 3


def test_default_smoother_mixes_exactly_the_two_hop_neighbourhood() -> None:
    model = _model(dropout=0.0).eval()  # two GCN layers, no residual
    inputs, ei = _inputs(36), _grid_graph(6)
    base = model.embed_graph(inputs, ei)
    assert not torch.allclose(base, model.embed_graph(inputs, ei, smoothed=False))

    def changed_rows(node: int) -> set[int]:
        moved = {k: v.clone() for k, v in inputs.items()}
        moved["x"][node] = moved["x"][node].flip(0) + 3.0
        moved["library"] = moved["x"].sum(1)
        diff = (model.embed_graph(moved, ei) - base).abs().amax(1)
        return set(torch.nonzero(diff > 1e-6).reshape(-1).tolist())

    # Node 14 sits at (2, 2) of the 6 x 6 grid: its two-hop ball is a diamond.
    two_hop = {r * 6 + c for r in range(6) for c in range(6) if abs(r - 2) + abs(c - 2) <= 2}
    assert changed_rows(14) == two_hop
