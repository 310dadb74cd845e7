"""Every loop under ``torchrun`` with two gloo processes: disjoint shards that cover the
training set exactly once, one shared split without any seed, identical replicas and
histories, and the same stop decision on both processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_loops_script.py")
ROOT = SCRIPT.parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None,
                                reason="torchrun not available")


def _load(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _torchrun(loop: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), "--loop", loop,
         "--unseeded", "--epochs", "12", "--ckpt", str(tmp_path / "run.pt"),
         "--out", str(tmp_path / "out.json"), *extra],
        env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("loop", ["full", "mini", "graph", "sampler"])
def test_two_processes_share_the_work_and_agree(loop, tmp_path):
    proc = _torchrun(loop, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _load(tmp_path / "out.json"), _load(tmp_path / "out.json.rank1")
    assert r0["world"] == r1["world"] == 2
    # one split for both processes although nothing was seeded
    assert r0["train_items"] == r1["train_items"]
    # the shards of an epoch are disjoint and cover the training set exactly once
    assert r0["coverage"] and r1["coverage"]
    assert not set(r0["coverage"]) & set(r1["coverage"])
    assert sorted(r0["coverage"] + r1["coverage"]) == sorted(r0["train_items"])
    # replicas stay identical, every epoch's (all-reduced) values agree, same stop
    assert r0["weights"] == r1["weights"]
    assert r0["history"] == r1["history"]
    assert r0["stopped"] == r1["stopped"] and r0["stop_reason"] == r1["stop_reason"]
    assert r0["history"][-1]["val_recon_loss"] < r0["history"][0]["val_recon_loss"]
    # validation means are exact: the shards' all-reduced means equal the means over
    # every validation batch (no item counted twice)
    for key, value in r0["val_whole"].items():
        assert r0["val_sharded"][key] == pytest.approx(value, rel=1e-5), key
    assert (tmp_path / "run.pt").exists() and not list(tmp_path.glob("*.tmp*"))


def test_processes_with_different_splits_are_refused(tmp_path):
    # an unseeded split drawn before the trainer joins the process group differs
    proc = _torchrun("mini", tmp_path, "--split-first")
    assert proc.returncode != 0
    assert "the processes hold different training cells" in proc.stderr
    assert not (tmp_path / "out.json").exists()
