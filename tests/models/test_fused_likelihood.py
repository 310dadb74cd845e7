"""The fused CPU likelihood kernel: exact values and gradients, no less accurate than the
elementwise formula in float32, the same results in the model as with the kernels off."""

from __future__ import annotations

import shutil

import pytest
import torch

from step.models import _fused as fused
from step.models._blocks import CountDecoder
from step.models._likelihoods import log_nb_from_logs, log_zinb_from_logs

CAN_BUILD = shutil.which("ninja") is not None and shutil.which("c++") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs a C++ compiler and ninja")

# counts of every branch of the kernel (zero, small integers, the largest small integer
# and the next, large and non-integer counts), inverse dispersions across the whole clamped
# range of log theta (-20, 20) on both sides of the Stirling threshold (10), means from
# tiny to huge and zero-inflation logits in both tails
COUNTS = [0.0, 1, 2, 3, 16, 17, 40, 1000, 0.3, 2.5]
LOG_THETAS = [-20.0, -6, -0.7, 1.0, 2.30, 2.31, 6, 20]
LOG_MUS = [-18.0, -4, -1, 0.5, 3, 9]
PI_LOGITS = [-25.0, -2, 0.5, 25]


def _grid() -> tuple[torch.Tensor, ...]:
    grid = torch.cartesian_prod(*(torch.tensor(v, dtype=torch.float64)
                                  for v in (COUNTS, LOG_THETAS, LOG_MUS, PI_LOGITS)))
    return tuple(t.contiguous().view(1, -1) for t in grid.T)


def _exact(x: float, log_theta: float, log_mu: float, pi_logit: float | None) -> float:
    """log p(x) at 40 significant digits."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(40):
        x, theta, mu = mp.mpf(x), mp.exp(mp.mpf(log_theta)), mp.exp(mp.mpf(log_mu))
        log_nb = (mp.loggamma(x + theta) - mp.loggamma(theta) - mp.loggamma(x + 1)
                  + theta * mp.log(theta / (theta + mu)) + x * mp.log(mu / (theta + mu)))
        if pi_logit is None:
            return float(log_nb)
        pi = 1 / (1 + mp.exp(-mp.mpf(pi_logit)))
        if x < 0.5:  # a zero, as in log_zinb_from_logs
            return float(mp.log(pi + (1 - pi) * (theta / (theta + mu)) ** theta))
        return float(mp.log(1 - pi) + log_nb)


@pytest.fixture(scope="module")
def exact_values() -> dict[str, torch.Tensor]:
    x, lt, lm, pl = _grid()
    points = list(zip(x.view(-1).tolist(), lt.view(-1).tolist(), lm.view(-1).tolist(),
                      pl.view(-1).tolist()))
    return {
        "nb": torch.tensor([_exact(a, b, c, None) for a, b, c, _ in points], dtype=torch.float64),
        "zinb": torch.tensor([_exact(*p) for p in points], dtype=torch.float64),
    }


def _error(values: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (values.double().view(-1) - exact).abs() / (1.0 + exact.abs())


@pytest.mark.parametrize("kind", ["nb", "zinb"])
@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_float64_values_are_exact(kind: str, per_cell_theta: bool,
                                  exact_values: dict[str, torch.Tensor]) -> None:
    x, lt, lm, pl = _grid()
    # one row of cells: (genes,) and (cells, genes) inverse dispersions hold the same values
    values = fused.fused_count_log_prob(x, lm, lt if per_cell_theta else lt.view(-1),
                                        pl if kind == "zinb" else None)
    assert _error(values, exact_values[kind]).max().item() < 1e-9


@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_float32_is_no_less_accurate_than_the_elementwise_formula(
        kind: str, exact_values: dict[str, torch.Tensor]) -> None:
    x, lt, lm, pl = (t.float() for t in _grid())
    zi = kind == "zinb"
    ours = _error(fused.fused_count_log_prob(x, lm, lt, pl if zi else None), exact_values[kind])
    formula = log_zinb_from_logs(x, lm, lt, pl) if zi else log_nb_from_logs(x, lm, lt)
    theirs = _error(formula, exact_values[kind])
    assert ours.max().item() <= theirs.max().item()
    # float32 rounding of the terms that cancel, up to about 2e4 (x = 1000 times log mu = 9
    # and log theta = 20)
    assert ours.max().item() < 5e-5
    assert ours.median().item() < 1e-7


@pytest.mark.parametrize("kind", ["nb", "zinb"])
@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_gradients_are_exact_in_float64(kind: str, per_cell_theta: bool) -> None:
    torch.manual_seed(0)
    x = torch.tensor([[0.0, 1, 2, 5, 16, 17, 30, 0.3, 2.5, 0.0, 4, 1]] * 3, dtype=torch.float64)
    log_mu = (2 * torch.randn(x.shape, dtype=torch.float64)).requires_grad_()
    # log theta of -4 to 4 around the Stirling threshold log 10 = 2.3
    shape = x.shape if per_cell_theta else x.shape[1:]
    log_theta = (torch.rand(shape, dtype=torch.float64) * 8 - 4).requires_grad_()
    pi = torch.randn(x.shape, dtype=torch.float64).requires_grad_() if kind == "zinb" else None
    inputs = (log_mu, log_theta) + ((pi,) if pi is not None else ())

    def f(*args: torch.Tensor) -> torch.Tensor:
        return fused.fused_count_log_prob(x, args[0], args[1], args[2] if pi is not None else None)

    torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_float32_gradients_match_the_elementwise_formula(kind: str) -> None:
    """Where the formula is well conditioned (|log mu - log theta| < 20, inside softplus's
    exact range), its autograd gradients and the kernel's agree to float32 rounding."""
    torch.manual_seed(1)
    x = torch.poisson(torch.rand(64, 50) * 6)
    x[:, :5] = torch.tensor([17.0, 40, 0.3, 2.5, 100])
    log_mu = (torch.randn(64, 50) * 2).requires_grad_()
    log_theta = (torch.randn(50) * 3).requires_grad_()
    pi = torch.randn(64, 50).requires_grad_()
    weights = torch.randn(64, 50)
    zi = kind == "zinb"
    ours = fused.fused_count_log_prob(x, log_mu, log_theta, pi if zi else None)
    ref = log_zinb_from_logs(x, log_mu, log_theta, pi) if zi else log_nb_from_logs(x, log_mu,
                                                                                   log_theta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    wrt = (log_mu, log_theta, pi) if zi else (log_mu, log_theta)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), wrt),
                    torch.autograd.grad((ref * weights).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_results_do_not_depend_on_the_number_of_threads() -> None:
    torch.manual_seed(2)
    x = torch.poisson(torch.rand(300, 40) * 3)
    log_mu = torch.randn(300, 40).requires_grad_()
    log_theta = torch.randn(40).requires_grad_()
    pi = torch.randn(300, 40).requires_grad_()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            value = fused.fused_count_log_prob(x, log_mu, log_theta, pi)
            results.append((value, *torch.autograd.grad(value.sum(), (log_mu, log_theta, pi))))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("likelihood", "dispersion"),
                         [("nb", "gene"), ("zinb", "gene"), ("zinb", "gene-batch")])
def test_decoder_gives_the_unfused_results(likelihood: str, dispersion: str) -> None:
    torch.manual_seed(3)
    decoder = CountDecoder(8, 30, hidden_dim=16, likelihood=likelihood, dispersion=dispersion,
                           n_batches=2)
    with torch.no_grad():
        if decoder.log_theta is not None:
            decoder.log_theta.normal_(0, 2)
    z, library = torch.randn(40, 8), torch.randint(100, 5000, (40,)).float()
    batch = torch.randint(0, 2, (40,))
    x = torch.poisson(torch.rand(40, 30) * 4)

    def loss() -> tuple[torch.Tensor, list[torch.Tensor]]:
        decoder.zero_grad()
        value = -decoder.log_prob(x, decoder(z, library, batch)).sum(-1).mean()
        value.backward()
        return value.detach(), [p.grad.clone() for p in decoder.parameters()]

    fused_loss, fused_grads = loss()
    with fused.fused_kernels_off():
        plain_loss, plain_grads = loss()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-4)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_counts_are_not_differentiated() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="counts"):
        fused.fused_count_log_prob(x, torch.zeros(2, 3), torch.zeros(3))


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(RuntimeError, match="inverse dispersions"):
        fused.fused_count_log_prob(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(4))
    with pytest.raises(RuntimeError, match="zero-inflation"):
        fused.fused_count_log_prob(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(3),
                                   torch.zeros(3, 2))
