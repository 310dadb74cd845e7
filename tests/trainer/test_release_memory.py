"""Handing freed memory back to the system during sub-graph training changes no result."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest

from step.datasets import spatial_benchmark_case
from step.functionality.comps.trainer import ReleaseFreedMemory, Trainer, seed_everything
from step.graph import NeighborSampler, build_spatial_graph
from step.models import TranscriptFormer
from step.utils import StDataset

SMALL = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "n_heads": 2}
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _history(dataset, edge_index, callbacks):
    seed_everything(0)
    model = TranscriptFormer(dataset.n_genes, **SMALL)
    model.init_smoother_with_builtin()
    trainer = Trainer(model, seed=0, verbose=False, callbacks=callbacks)
    trainer.init_optimizer(lr=3e-3)
    sampler = NeighborSampler(edge_index, len(dataset), num_neighbors=(6, 4), batch_size=64,
                              seed=0, sections=dataset.batch_codes)
    trainer.train_node_sampler(2, sampler, dataset)
    return trainer.history


def test_releases_leave_the_training_unchanged():
    adata = spatial_benchmark_case("patches_hex_sections", seed=0)
    dataset = StDataset(adata, batch_key="section", spatial_key="spatial")
    edge_index = build_spatial_graph(dataset.spatial, dataset.section_codes, method="hex")
    release = ReleaseFreedMemory(threshold_mib=1e-6)  # release after nearly every step
    plain = _history(dataset, edge_index, [])
    released = _history(dataset, edge_index, [release])
    assert release.available == GLIBC
    if GLIBC:
        assert release.releases >= 3  # at the start, then whenever memory grew
    for column in ("recon_loss", "total_loss"):
        np.testing.assert_array_equal(released[column].to_numpy(), plain[column].to_numpy())


@pytest.mark.parametrize("value", [0, -5, True, "256"])
def test_bad_thresholds_are_refused(value):
    with pytest.raises(ValueError, match="positive number"):
        ReleaseFreedMemory(threshold_mib=value)


_FAULTS_SCRIPT = """
import ctypes, ctypes.util, resource, sys
import torch
from step.functionality.comps.trainer import reuse_freed_memory

def faults_per_step():
    # two buffers of the size of a feed-forward product (128 cells x 33 tokens x 256)
    # allocated, written and freed, as a training step does
    for _ in range(3):
        a = torch.ones(4224, 256); b = torch.ones(4224, 256); del a, b
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = torch.ones(4224, 256); b = torch.ones(4224, 256); del a, b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20

# glibc's initial mmap threshold, fixed: every such buffer is mapped anew
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)
before = faults_per_step()
applied = reuse_freed_memory()
print(before, faults_per_step(), applied, reuse_freed_memory())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings")
def test_reused_memory_spares_the_page_faults_of_fresh_buffers():
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True,
                         text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert out[2:] == ["True", "True"]
    assert before > 1500  # two buffers of 1,056 pages, faulted in page by page
    assert after < 0.05 * before


def test_the_trainer_reuses_freed_memory_on_the_cpu_unless_told_not_to(monkeypatch):
    import step.functionality.comps.trainer._trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_memory", lambda: calls.append(1) or True)
    model = TranscriptFormer(20, **SMALL)
    assert Trainer(model, verbose=False).reuses_freed_memory
    assert len(calls) == 1
    assert not Trainer(model, verbose=False, reuse_freed_memory=False).reuses_freed_memory
    assert len(calls) == 1
