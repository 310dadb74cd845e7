"""Count likelihoods against torch.distributions and scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from step.models._likelihoods import (
    _lgamma_ratio,
    log_nb,
    log_nb_from_logs,
    log_poisson,
    log_poisson_from_logs,
    log_zinb,
    log_zinb_from_logs,
)

COUNTS = np.array([0, 1, 2, 3, 7, 20, 150, 1000], dtype=np.float64)
MEANS = np.array([1e-3, 0.1, 1.0, 5.0, 50.0, 800.0])
THETAS = np.array([1e-3, 0.05, 0.5, 1.0, 4.0, 9.99, 10.0, 10.01, 30.0, 1e3])


def _grid(*axes: np.ndarray) -> list[np.ndarray]:
    return [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]


def _t(a: np.ndarray | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _nb_reference(x: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Float64 NB log-pmf written out by hand (valid for extreme parameters)."""
    return (
        special.gammaln(x + theta)
        - special.gammaln(theta)
        - special.gammaln(x + 1)
        - theta * np.log1p(mu / theta)
        + x * (np.log(mu) - np.log(theta + mu))
    )


def _zinb_reference(x, mu, theta, pi_logits) -> np.ndarray:
    log_pi = -np.logaddexp(0.0, -pi_logits)
    log_keep = -np.logaddexp(0.0, pi_logits)
    nb = _nb_reference(x, mu, theta)
    return np.where(x == 0, np.logaddexp(log_pi, log_keep + nb), log_keep + nb)


def _close(got: torch.Tensor, ref: np.ndarray, rtol: float) -> None:
    got_np = got.double().numpy()
    assert np.isfinite(got_np).all()
    np.testing.assert_allclose(got_np, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def test_poisson_matches_torch_distribution() -> None:
    x, mu = _grid(COUNTS, MEANS)
    ref = torch.distributions.Poisson(_t(mu, torch.float64)).log_prob(_t(x, torch.float64))
    _close(log_poisson(_t(x), _t(mu)), ref.numpy(), 1e-5)
    _close(log_poisson_from_logs(_t(x), torch.log(_t(mu))), ref.numpy(), 1e-5)


def test_nb_matches_torch_distribution() -> None:
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    dist = torch.distributions.NegativeBinomial(
        total_count=_t(theta, torch.float64),
        logits=torch.log(_t(mu, torch.float64)) - torch.log(_t(theta, torch.float64)),
    )
    ref = dist.log_prob(_t(x, torch.float64)).numpy()
    _close(log_nb(_t(x), _t(mu), _t(theta)), ref, 2e-5)


def test_nb_matches_scipy_nbinom() -> None:
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    _close(log_nb(_t(x), _t(mu), _t(theta)), ref, 2e-5)
    _close(log_nb_from_logs(_t(x), _t(np.log(mu)), _t(np.log(theta))), ref, 2e-5)


def test_nb_float64_inputs_are_exact() -> None:
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    got = log_nb(_t(x, torch.float64), _t(mu, torch.float64), _t(theta, torch.float64))
    # Stirling series truncation near theta = 10 is below 1e-8.
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("pi_logit", [-30.0, -2.0, 0.0, 1.5, 30.0])
def test_zinb_matches_hand_computed_scipy(pi_logit: float) -> None:
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    pi = special.expit(pi_logit)
    nb_logpmf = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    nb_pmf0 = stats.nbinom.pmf(0, theta, theta / (theta + mu))
    with np.errstate(divide="ignore"):
        ref = np.where(
            x == 0,
            np.log(pi + (1 - pi) * nb_pmf0),
            np.log1p(-pi) + nb_logpmf,
        )
    # log1p(-pi) underflows in float64 for pi_logit = 30; use the exact form there.
    ref = np.where(np.isfinite(ref), ref, _zinb_reference(x, mu, theta, np.full_like(x, pi_logit)))
    got = log_zinb(_t(x), _t(mu), _t(theta), torch.full((x.size,), pi_logit))
    _close(got, ref, 2e-5)


def test_zinb_without_inflation_is_nb() -> None:
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    nb = log_nb(_t(x), _t(mu), _t(theta))
    zinb = log_zinb(_t(x), _t(mu), _t(theta), torch.full((x.size,), -1e4))
    torch.testing.assert_close(zinb, nb, rtol=1e-6, atol=1e-5)


EXTREME_THETA = np.array([1e-8, 1e-5, 1e-2, 1e2, 1e5, 1e8])
EXTREME_MU = np.array([1e-12, 1e-6, 1e-2, 1e2, 1e5])
EXTREME_X = np.array([0, 1, 5, 60, 2000], dtype=np.float64)


def test_nb_is_accurate_for_extreme_parameters() -> None:
    x, mu, theta = _grid(EXTREME_X, EXTREME_MU, EXTREME_THETA)
    ref = _nb_reference(x, mu, theta)
    got = log_nb(_t(x), _t(mu), _t(theta)).double().numpy()
    assert np.isfinite(got).all()
    # float32 keeps about 7 significant digits of the largest intermediate term
    # (lgamma(x + 1) for x = 2000 is about 1.3e4), hence the absolute slack.
    scale = np.maximum(1.0, special.gammaln(x + 1) + special.gammaln(x + theta).clip(0, 1e4))
    np.testing.assert_array_less(np.abs(got - ref) / scale, 5e-6)


def test_large_theta_approaches_poisson() -> None:
    x, mu = _grid(COUNTS, MEANS)
    poisson = log_poisson(_t(x), _t(mu))
    nb = log_nb(_t(x), _t(mu), torch.full((x.size,), 1e9))
    torch.testing.assert_close(nb, poisson, rtol=1e-4, atol=1e-3)


def test_lgamma_ratio_is_continuous_at_the_series_switch() -> None:
    x = torch.tensor([0.0, 1.0, 4.0, 50.0, 3000.0], dtype=torch.float64)
    for theta in (9.999999, 10.0, 10.000001, 10.5, 1e3):
        ref = special.gammaln(x.numpy() + theta) - special.gammaln(theta)
        got = _lgamma_ratio(x, torch.full_like(x, theta))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("theta", [0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30])
@pytest.mark.parametrize("mu", [0.0, 1e-30, 1e-8, 1.0, 1e6])
def test_values_and_gradients_stay_finite(theta: float, mu: float) -> None:
    x = torch.tensor([0.0, 0.0, 1.0, 3.0, 40.0, 1000.0])
    pi = torch.tensor([-1e4, 0.0, 1e4, -50.0, 50.0, 3.0], requires_grad=True)
    mu_t = torch.full_like(x, mu, requires_grad=True)
    theta_t = torch.full_like(x, theta, requires_grad=True)
    for value in (
        log_poisson(x, mu_t),
        log_nb(x, mu_t, theta_t),
        log_zinb(x, mu_t, theta_t, pi),
    ):
        assert torch.isfinite(value).all()
        grads = torch.autograd.grad(value.sum(), [mu_t, theta_t, pi], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_log_space_variants_are_finite_for_extreme_logs() -> None:
    x = torch.tensor([0.0, 2.0, 500.0])
    for log_mu in (-80.0, 0.0, 15.0):
        for log_theta in (-20.0, 0.0, 20.0):
            lm = torch.full_like(x, log_mu, requires_grad=True)
            lt = torch.full_like(x, log_theta, requires_grad=True)
            pi = torch.zeros_like(x, requires_grad=True)
            out = log_zinb_from_logs(x, lm, lt, pi) + log_nb_from_logs(x, lm, lt)
            grads = torch.autograd.grad(out.sum(), [lm, lt, pi])
            assert torch.isfinite(out).all()
            assert all(torch.isfinite(g).all() for g in grads)


def test_broadcasting_per_gene_parameters() -> None:
    x = torch.poisson(torch.full((4, 6), 2.0))
    mu = torch.rand(4, 6) * 5 + 0.1
    theta = torch.rand(6) * 3 + 0.1
    full = log_nb(x, mu, theta.expand(4, 6))
    torch.testing.assert_close(log_nb(x, mu, theta), full)
