"""Training from an on-disk store under ``torchrun`` (gloo): per-process peak RSS, speed
and which rows each process read.

Every process opens the same ``.h5ad`` file and walks the same block-shuffled batch
sequence; the mini-batch source deals the batches round-robin and gathers only the
process's own positions from disk. Each process records the positions it gathered, so
the caller can check that the processes read disjoint rows and no more than their share.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

BATCH_SIZE = 128
BLOCK = {"block_size": 64, "buffer_blocks": 16}



def worker(path: Path, steps: int, out: Path) -> None:
    """One process: train ``steps`` steps from ``path``; write its timings and rows."""
    import torch

    from step.functionality.comps.trainer import Trainer
    from step.models import TranscriptFormer
    from step.utils import OnDiskDataset, index_loader

    class RecordingDataset(OnDiskDataset):
        """Remembers every position gathered from disk."""

        gathered: list[np.ndarray] = []

        def __getitem__(self, idx: Any) -> Any:
            self.gathered.append(np.asarray(idx, dtype=np.int64).reshape(-1))
            return super().__getitem__(idx)

    torch.set_num_threads(1)
    dataset = RecordingDataset(path)
    model = TranscriptFormer(dataset.n_genes, **C.OUR_DEFAULTS)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=1e-3)
    loader = index_loader(dataset, BATCH_SIZE, seed=0, **BLOCK)
    start = time.perf_counter()
    trainer.train_batch(1, (loader, None), steps_per_epoch=steps)
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    rows = np.concatenate(dataset.gathered) if dataset.gathered else np.empty(0, np.int64)
    np.save(out / f"rows{rank}.npy", rows)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "steps": steps,
        "rows_read": int(rows.size), "seconds": seconds, "cells_per_s": rows.size / seconds,
        "peak_rss": C.peak_rss()}))


def launch(processes: int, path: Path, steps: int) -> dict[str, Any]:
    """Run ``processes`` workers; return their rows and whether they read disjoint rows."""
    torchrun = Path(sys.executable).parent / "torchrun"
    torchrun_cmd = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--worker", str(path), str(steps), tmp]
        if processes == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [torchrun_cmd, "--standalone", f"--nproc_per_node={processes}", *args]
        env = C.child_env(1)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.ROOT), str(C.HERE),
                                                         env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(processes)]
        rows = [np.load(Path(tmp) / f"rows{r}.npy") for r in range(processes)]
    union = np.unique(np.concatenate(rows))
    return {"ranks": ranks, "disjoint": bool(union.size == sum(r.size for r in rows)),
            "own_share_only": all(r.size <= steps * BATCH_SIZE for r in rows)}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
