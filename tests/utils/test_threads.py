"""Clustering and UMAP helpers leave torch's thread count as the caller set it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from step.utils.threads import keep_torch_threads

# numba's OpenMP layer resets the shared runtime on its first launch in a process, so
# the check needs a fresh interpreter in which torch's thread pool already runs.
_CHILD = textwrap.dedent(
    """
    import numpy as np, torch
    from step.workflows._cluster import leiden_for_n_clusters
    torch.set_num_threads(1)
    x = torch.randn(1000, 1000)
    torch.where(x > 0, x, -x)  # start torch's OpenMP team with one thread
    rep = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    leiden_for_n_clusters(rep, 4, n_neighbors=10)
    print(torch.get_num_threads())
    """
)


def test_keep_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    try:
        with keep_torch_threads():
            torch.set_num_threads(before + 1)
        assert torch.get_num_threads() == before
        with pytest.raises(RuntimeError), keep_torch_threads():
            torch.set_num_threads(before + 1)
            raise RuntimeError
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to change the count")
def test_leiden_clustering_keeps_one_torch_thread() -> None:
    # numba resets to its own default, every core; an OMP_NUM_THREADS=1 inherited from
    # the caller would make the reset invisible, so the child gets every core.
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1"
