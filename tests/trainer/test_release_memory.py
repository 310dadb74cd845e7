"""Handing freed memory back to the system during sub-graph training changes no result."""

from __future__ import annotations

import platform
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
