"""Count likelihoods as pure, elementwise log-probability functions.

Every function returns ``log p(x)`` elementwise (same broadcast shape as its
arguments) and is written in log space so that it stays finite for extreme
parameters: means close to zero, inverse dispersions from ``1e-8`` to ``1e8``
and zero-inflation logits far in either tail.

Two flavours are offered for each likelihood:

* ``log_poisson(x, mu)``, ``log_nb(x, mu, theta)``, ``log_zinb(x, mu, theta,
  pi_logits)`` take the natural parameters (means and inverse dispersions must
  be non-negative; zeros are clamped to the smallest positive normal number).
* ``*_from_logs`` variants take ``log_mu`` and ``log_theta`` directly. The model
  uses these: its rate is ``library * softmax(logits)``, whose logarithm is
  exact as ``log(library) + log_softmax(logits)``, so no precision is lost by
  exponentiating and taking the logarithm again.

Parametrisation
---------------
Negative binomial with mean ``mu`` and inverse dispersion ``theta``
(variance ``mu + mu**2 / theta``)::

    log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
               + theta * log(theta / (theta + mu)) + x * log(mu / (theta + mu))

This is ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))`` and
``torch.distributions.NegativeBinomial(total_count=theta,
logits=log(mu) - log(theta))``. The zero-inflated variant mixes a point mass at
zero with probability ``sigmoid(pi_logits)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "log_nb",
    "log_nb_from_logs",
    "log_poisson",
    "log_poisson_from_logs",
    "log_zinb",
    "log_zinb_from_logs",
]

# Above this inverse dispersion, lgamma(x + theta) - lgamma(theta) is evaluated
# from Stirling's series: the direct difference of two huge lgamma values loses
# all float32 precision (lgamma(1e8) is about 1.7e9).
_STIRLING_MIN = 10.0


def _safe_log(t: Tensor) -> Tensor:
    """Logarithm with zeros clamped to the smallest positive normal number."""
    return torch.log(t.clamp_min(torch.finfo(t.dtype).tiny))


def _lgamma_ratio(x: Tensor, theta: Tensor) -> Tensor:
    """``lgamma(x + theta) - lgamma(theta)`` without cancellation for large theta.

    For ``theta >= 10`` Stirling's series is used up to its ``1 / theta**3``
    term (truncation error below 1e-8); the direct difference of two huge
    lgamma values would lose all float32 precision there (``lgamma(1e8)`` is
    about 1.7e9).

    Parameters
    ----------
    x
        Non-negative counts.
    theta
        Positive inverse dispersion, broadcastable against ``x``.

    Returns
    -------
    Tensor
        The log of the rising factorial ``Gamma(x + theta) / Gamma(theta)``.
    """
    direct = torch.lgamma(x + theta) - torch.lgamma(theta)
    # Clamped so that the branch not chosen stays finite (a non-finite value in
    # the unused branch of ``where`` would poison the gradients).
    z = theta.clamp_min(_STIRLING_MIN)
    inv_z = torch.reciprocal(z)
    zx = x + z
    inv_zx = torch.reciprocal(zx)
    # 1/(12 zx) - 1/(12 z) - 1/(360 zx^3) + 1/(360 z^3), factored through
    # inv_zx - inv_z = -x / (z * zx) so that nothing cancels.
    step = -x * inv_z * inv_zx
    correction = step * (1.0 / 12.0 - (inv_zx * inv_zx + inv_zx * inv_z + inv_z * inv_z) / 360.0)
    series = (zx - 0.5) * torch.log1p(x * inv_z) + x * (torch.log(z) - 1.0) + correction
    return torch.where(theta >= _STIRLING_MIN, series, direct)


def log_poisson_from_logs(x: Tensor, log_mu: Tensor) -> Tensor:
    """Poisson log-probability from the log mean.

    Parameters
    ----------
    x
        Counts, any shape.
    log_mu
        Log of the mean, broadcastable against ``x``.

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise.
    """
    return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0)


def log_poisson(x: Tensor, mu: Tensor) -> Tensor:
    """Poisson log-probability.

    Parameters
    ----------
    x
        Counts, any shape.
    mu
        Non-negative mean, broadcastable against ``x``.

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise; finite even where ``mu == 0``.
    """
    return log_poisson_from_logs(x, _safe_log(mu))


def log_nb_from_logs(x: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """Negative binomial log-probability from log mean and log inverse dispersion.

    Parameters
    ----------
    x
        Counts, any shape.
    log_mu
        Log of the mean, broadcastable against ``x``.
    log_theta
        Log of the inverse dispersion, broadcastable against ``x``.

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise.
    """
    theta = torch.exp(log_theta)
    delta = log_mu - log_theta
    # theta * log(theta / (theta + mu)) = -theta * softplus(delta) and
    # x * log(mu / (theta + mu)) = -x * softplus(-delta) = -x * (softplus(delta) - delta):
    # exact in both tails, never 0 * inf, one softplus for both.
    log_ratio = F.softplus(delta)
    return (
        -theta * log_ratio
        - x * (log_ratio - delta)
        + _lgamma_ratio(x, theta)
        - torch.lgamma(x + 1.0)
    )


def log_nb(x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """Negative binomial log-probability (mean / inverse-dispersion form).

    Parameters
    ----------
    x
        Counts, any shape.
    mu
        Non-negative mean, broadcastable against ``x``.
    theta
        Positive inverse dispersion, broadcastable against ``x``.

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise.
    """
    return log_nb_from_logs(x, _safe_log(mu), _safe_log(theta))


def log_zinb_from_logs(x: Tensor, log_mu: Tensor, log_theta: Tensor, pi_logits: Tensor) -> Tensor:
    """Zero-inflated negative binomial log-probability from log parameters.

    Parameters
    ----------
    x
        Counts, any shape.
    log_mu
        Log of the negative binomial mean, broadcastable against ``x``.
    log_theta
        Log of the inverse dispersion, broadcastable against ``x``.
    pi_logits
        Logits of the probability of an extra (structural) zero.

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise.
    """
    theta = torch.exp(log_theta)
    delta = log_mu - log_theta
    log_ratio = F.softplus(delta)
    log_nb_zero = -theta * log_ratio
    # log(1 - pi) = -softplus(pi_logits) and log(pi) = pi_logits - softplus(pi_logits).
    log_norm = F.softplus(pi_logits)
    at_zero = torch.logaddexp(pi_logits, log_nb_zero) - log_norm
    positive = (
        log_nb_zero
        - log_norm
        - x * (log_ratio - delta)
        + _lgamma_ratio(x, theta)
        - torch.lgamma(x + 1.0)
    )
    return torch.where(x < 0.5, at_zero, positive)


def log_zinb(x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor) -> Tensor:
    """Zero-inflated negative binomial log-probability.

    Parameters
    ----------
    x
        Counts, any shape.
    mu
        Non-negative negative binomial mean, broadcastable against ``x``.
    theta
        Positive inverse dispersion, broadcastable against ``x``.
    pi_logits
        Logits of the probability of an extra zero (``sigmoid(pi_logits)``).

    Returns
    -------
    Tensor
        ``log p(x)`` elementwise.
    """
    return log_zinb_from_logs(x, _safe_log(mu), _safe_log(theta), pi_logits)
