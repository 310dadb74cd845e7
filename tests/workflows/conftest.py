"""Fixtures of the workflow tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _restore_threads():
    """Give the thread count back as it was after the workflow tests."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Train single-threaded: on a shared, busy machine, intra-op threads that wait for
    each other make small-batch training many times slower. Set again before every test
    because scanpy and scikit-learn calls (through threadpoolctl) reset the size of the
    OpenMP pool that torch uses."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread_module() -> None:
    """The same for models trained by module-scoped fixtures."""
    torch.set_num_threads(1)
