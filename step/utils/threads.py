"""Keep torch's intra-op thread count across calls into other numerical libraries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["keep_torch_threads"]


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore ``torch.get_num_threads()`` when the block exits.

    scanpy's ``neighbors`` and ``umap`` run numba kernels whose OpenMP layer shares
    the OpenMP runtime torch loads and sets its thread count to every core. Without
    this guard a process limited to one thread (``step fit --threads 1``, a
    benchmark, several jobs sharing a machine) trains on every core after its
    first clustering, and jobs side by side oversubscribe the cores.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
