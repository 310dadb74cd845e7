"""Data-parallel speed-up of ``Trainer.train_batch`` under ``torchrun`` (gloo, CPU).

The same training (TranscriptFormer with this package's defaults, batch size 128 per
process, Adam at 1e-3, no validation loader) runs once as 1 process × 1 thread and once
as 2 processes × 1 thread started by ``torchrun --standalone``. Cells per second count
the whole training set once per epoch, from the step timestamps of rank 0, first epoch
excluded. The ratio is the 2-process rate over the 1-process rate of the same run
(target: at least 1.7×). With two processes every optimizer step covers two batches, so
an epoch has half as many steps.

Usage::

    python benchmarks/data_parallel.py --quick      # 10k synthetic cells
    python benchmarks/data_parallel.py              # 10k and 50k synthetic cells
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

BATCH_SIZE = 128
SIZES = {"quick": [10_000], "full": [10_000, 50_000]}
EPOCHS = {"quick": 3, "full": 4}


def worker(n_cells: int, epochs: int, out: Path) -> None:
    """One process of a run (plain or under torchrun); rank 0 writes the timings."""
    import torch

    from step.datasets import synthetic_counts
    from step.functionality.comps.trainer import Trainer
    from step.models import TranscriptFormer
    from step.utils.dataset import ScDataset, index_loader

    torch.set_num_threads(1)
    adata = synthetic_counts(n_cells, 2000, density=0.05, seed=0)
    dataset = ScDataset(adata)
    model = TranscriptFormer(dataset.n_genes, **C.OUR_DEFAULTS)
    clock = C.StepClock("cpu")
    trainer = Trainer(model, seed=0, verbose=False, callbacks=[clock])
    trainer.init_optimizer(lr=1e-3)
    loader = index_loader(dataset, BATCH_SIZE, shuffle=True, seed=0)
    start = time.perf_counter()
    trainer.train_batch(epochs, (loader, None))
    steps = len(clock.times) // epochs
    ends = [clock.times[(e + 1) * steps - 1] for e in range(epochs)]
    steady = ends[-1] - ends[0]
    if trainer.is_main_process:
        out.write_text(json.dumps({
            "world": int(os.environ.get("WORLD_SIZE", "1")), "steps_per_epoch": steps,
            "first_epoch_s": ends[0] - start, "cells_per_s": n_cells * (epochs - 1) / steady}))


def launch(processes: int, n_cells: int, epochs: int) -> dict[str, Any]:
    torchrun = Path(sys.executable).parent / "torchrun"
    torchrun_cmd = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        args = [__file__, "--worker", str(n_cells), str(epochs), str(out)]
        if processes == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [torchrun_cmd, "--standalone", f"--nproc_per_node={processes}", *args]
        env = C.child_env(1)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(out.read_text())


def main() -> None:
    parser = C.base_parser(__doc__)
    args = parser.parse_args()
    args.threads = 1
    C.setup(args)
    mode = "quick" if args.quick else "full"
    info = C.machine(args)
    table = C.Table("data_parallel", "train_batch cells/s: 2 processes × 1 thread vs 1 × 1", [
        C.Column("cells", "cells", C.fmt_int),
        C.Column("processes", "processes"),
        C.Column("steps_per_epoch", "steps/epoch"),
        C.Column("cells_per_s", "cells/s", C.fmt_int),
        C.Column("ratio", "vs 1 process", C.fmt_ratio),
        C.Column("gemm", "GEMM probe GFLOP/s", C.fmt_float(1)),
    ])
    for n in SIZES[mode]:
        base = None
        for processes in (1, 2):
            gemm = C.load_probe()
            res = launch(processes, n, EPOCHS[mode])
            base = res["cells_per_s"] if processes == 1 else base
            table.add(cells=n, processes=processes, steps_per_epoch=res["steps_per_epoch"],
                      cells_per_s=res["cells_per_s"], ratio=res["cells_per_s"] / base,
                      gemm=gemm)
    table.notes.append(f"TranscriptFormer {C.OUR_DEFAULTS}, synthetic counts (2,000 genes, "
                       "5 % non-zero), gloo backend, one torch thread per process; the "
                       "first epoch is excluded.")
    C.write_report("data_parallel", "Data-parallel training", C.doc_intro(__doc__), [table],
                   info, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
