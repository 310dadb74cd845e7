"""A small stand-in for TranscriptFormer with the same named parts, for mechanics tests."""

from __future__ import annotations

import torch
from torch import nn


class ToyVAE(nn.Module):
    """Gaussian VAE on log counts with TranscriptFormer's attribute names."""

    def __init__(self, n_genes: int = 20, hidden: int = 8, latent: int = 4,
                 n_batches: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_batches = n_batches
        self.kl_weight = 1.0
        self.moduler = nn.Linear(n_genes, hidden)
        self.cls_token = nn.Parameter(torch.zeros(hidden))
        self.expand = nn.Linear(hidden, hidden)
        self.transformer = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.readout = nn.Linear(hidden, 2 * latent)
        self.decoder = nn.Linear(latent, n_genes)
        self.batch_embedding = nn.Embedding(n_batches, latent) if n_batches > 1 else None
        self.batch_readout = nn.Linear(latent, latent) if n_batches > 1 else None
        self.smoother = None
        self.anchors = None
        self.classifier = None

    @property
    def config(self) -> dict:
        return {"n_genes": self.moduler.in_features, "n_batches": self.n_batches}

    def attach_smoother(self) -> None:
        hidden = self.expand.out_features
        self.smoother = nn.Linear(hidden, hidden)

    def encode(self, inputs):
        x = torch.log1p(inputs["x"])
        h = self.transformer(self.expand(self.moduler(x)) + self.cls_token)
        if self.smoother is not None and inputs.get("smooth", False):
            h = h + self.smoother(h)
        mu, logvar = self.readout(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-6, 6)

    def loss(self, inputs, *, kl_weight=None):
        mu, logvar = self.encode(inputs)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        if self.batch_embedding is not None and "batch" in inputs:
            z = z + self.batch_readout(self.batch_embedding(inputs["batch"]))
        recon = ((self.decoder(z) - torch.log1p(inputs["x"])) ** 2).sum(1).mean()
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1).mean()
        w = self.kl_weight if kl_weight is None else kl_weight
        return {"recon_loss": recon, "kl_loss": w * kl}

    def graph_loss(self, inputs, edge_index, *, loss_mask=None, end_to_end=False, kl_weight=None):
        h_in = dict(inputs, smooth=True)
        mu, logvar = self.encode(h_in)
        src, dst = edge_index
        agg = torch.zeros_like(mu).index_add_(0, dst, mu[src])
        deg = torch.zeros(len(mu), device=mu.device).index_add_(
            0, dst, torch.ones_like(dst, dtype=mu.dtype)).clamp_min(1)
        z = agg / deg[:, None]
        mask = torch.ones(len(mu), dtype=torch.bool) if loss_mask is None else loss_mask
        recon = ((self.decoder(z) - torch.log1p(inputs["x"])) ** 2).sum(1)[mask].mean()
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)[mask].mean()
        out = {"recon_loss": recon, "kl_loss": kl}
        if end_to_end:
            out["raw_recon_loss"] = ((self.decoder(mu) - torch.log1p(inputs["x"])) ** 2).sum(1)[mask].mean()
        return out

    def embed(self, inputs):
        return self.encode(inputs)[0]


def toy_counts(n: int = 120, n_genes: int = 20, seed: int = 0) -> torch.Tensor:
    """Poisson counts from three groups of cells with different mean profiles."""
    g = torch.Generator().manual_seed(seed)
    profiles = torch.rand(3, n_genes, generator=g) * 6
    groups = torch.arange(n) % 3
    return torch.poisson(profiles[groups], generator=g)


def dict_batches(x: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
    """A DataLoader over dict items built from a counts tensor."""
    from torch.utils.data import DataLoader

    data = [{"x": row, "library": row.sum()} for row in x]
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
