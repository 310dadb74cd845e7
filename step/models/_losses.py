"""Pure loss functions used by the model: KL with free bits, InfoNCE, anchors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "anchor_logits",
    "gaussian_kl",
    "info_nce",
    "kl_divergence_loss",
    "sample_rows",
]


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL divergence of ``N(mu, exp(logvar))`` from ``N(0, I)``, per dimension.

    Parameters
    ----------
    mu
        Posterior means, shape ``(n, d)``.
    logvar
        Posterior log-variances, shape ``(n, d)``.

    Returns
    -------
    Tensor
        Elementwise KL, shape ``(n, d)``.
    """
    return 0.5 * (mu.square() + torch.exp(logvar) - logvar - 1.0)


def kl_divergence_loss(
    mu: Tensor, logvar: Tensor, *, weight: float = 1.0, free_bits: float = 0.0
) -> Tensor:
    """Weighted KL term: summed over latent dimensions, averaged over cells.

    With ``free_bits > 0`` each dimension's KL, averaged over the cells of the
    batch, is clamped from below at ``free_bits`` nats before summing. A
    dimension whose KL is under the threshold then contributes a constant and
    receives no gradient, so the encoder is free to use that much information
    per dimension without being pushed back to the prior.

    Parameters
    ----------
    mu
        Posterior means, shape ``(n, d)``.
    logvar
        Posterior log-variances, shape ``(n, d)``.
    weight
        Multiplier (beta) applied to the result.
    free_bits
        Per-dimension floor in nats; ``0`` disables it.

    Returns
    -------
    Tensor
        Scalar tensor.
    """
    per_dim = gaussian_kl(mu, logvar).mean(dim=0)
    if free_bits > 0:
        per_dim = per_dim.clamp_min(free_bits)
    return weight * per_dim.sum()


def sample_rows(n: int, k: int, *, device: torch.device | None = None) -> Tensor | None:
    """Draw the indices of at most ``k`` of ``n`` rows, without replacement.

    Parameters
    ----------
    n
        Number of rows available.
    k
        Largest number of rows to keep.
    device
        Device of the returned indices.

    Returns
    -------
    Tensor or None
        A LongTensor of ``min(n, k)`` distinct indices, or ``None`` when every
        row is kept (``n <= k``), so callers can skip the gather.
    """
    if k < 1:
        msg = f"the number of rows to sample must be at least 1, got {k}"
        raise ValueError(msg)
    if n <= k:
        return None
    return torch.randperm(n, device=device)[:k]


def info_nce(anchor: Tensor, positive: Tensor, *, temperature: float) -> Tensor:
    """Symmetric InfoNCE between two views of the same rows.

    Row ``i`` of ``anchor`` and row ``i`` of ``positive`` form the positive
    pair; every other row of the other view is a negative. Both views are
    L2-normalised, so the logits are cosine similarities over ``temperature``.

    Parameters
    ----------
    anchor
        First view, shape ``(m, d)``.
    positive
        Second view, shape ``(m, d)``.
    temperature
        Softmax temperature, positive.

    Returns
    -------
    Tensor
        Scalar: the mean of the two directional cross-entropies.
    """
    a = F.normalize(anchor, dim=-1)
    b = F.normalize(positive, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def anchor_logits(points: Tensor, anchors: Tensor, *, temperature: float) -> Tensor:
    """Class logits from negative squared distances to class anchors.

    Parameters
    ----------
    points
        Representations, shape ``(n, d)``.
    anchors
        One anchor per class, shape ``(c, d)``.
    temperature
        Divides the negative squared distances.

    Returns
    -------
    Tensor
        Logits, shape ``(n, c)``.
    """
    sq_dist = (
        points.square().sum(-1, keepdim=True) - 2.0 * points @ anchors.T + anchors.square().sum(-1)
    )
    return -sq_dist.clamp_min(0.0) / temperature
