"""What reusing freed memory saves in single-cell training on the CPU.

``Trainer(reuse_freed_memory=True)`` (the default on the CPU) sets glibc's mmap and
trim thresholds so that the buffers one training step frees are reused by the next
instead of being returned to the system and faulted in again page by page
(:func:`step.functionality.comps.trainer.reuse_freed_memory`). The setting holds for
a whole process, so each measurement runs in a fresh process, alternating between the
two settings: ``reuse_freed_memory=False`` (glibc's own behaviour) and ``True``.

Each process trains step-kit's architecture (3 layers, 8 heads, zero-inflated negative
binomial) on the 700 PBMCs with batches of 128 through ``Trainer.train_batch``: two
epochs of warm-up, then the measured epochs. It reports milliseconds per 128 cells of
wall time and of user and system CPU time (``getrusage``; the system time is mostly
the kernel's handling of page faults), the minor page faults per step and the peak
resident memory of the process. The table gives the median over the repeats and the
ratio of the training rates.

Usage::

    python benchmarks/allocator.py --quick --threads 1
    python benchmarks/allocator.py --threads 2 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Any

import _common as C

BATCH_SIZE = 128
SETTINGS = {False: "glibc's defaults", True: "freed memory reused (default)"}


def child(reuse: bool, precision: str, threads: int, epochs: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from step.datasets import pbmc68k_counts
    from step.functionality.comps.trainer import Trainer
    from step.models import TranscriptFormer
    from step.utils.dataset import ScDataset, index_loader
    from throughput import KL_WEIGHT, LR

    torch.set_num_threads(threads)
    dataset = ScDataset(pbmc68k_counts())
    model = TranscriptFormer(dataset.n_genes, kl_weight=KL_WEIGHT, **C.SAME_ARCH)
    trainer = Trainer(model, seed=0, precision=precision, verbose=False,
                      reuse_freed_memory=reuse, distributed=False)
    trainer.init_optimizer(lr=LR)
    loader = index_loader(dataset, BATCH_SIZE, shuffle=True, seed=0)
    trainer.train_batch(2, (loader, None))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    trainer.train_batch(epochs, (loader, None))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_cells = BATCH_SIZE / (epochs * len(dataset)) * 1e3
    return {"reuse": trainer.reuses_freed_memory, "precision": trainer.precision,
            "wall_ms": wall * per_cells, "user_ms": (after.ru_utime - before.ru_utime) * per_cells,
            "sys_ms": (after.ru_stime - before.ru_stime) * per_cells,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / (epochs * len(loader)),
            "peak_rss": C.peak_rss()}


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=("fp32", "bf16"), help="precisions to measure")
    parser.add_argument("--repeats", type=int, default=None,
                        help="processes per setting and precision (default 4, quick 3)")
    parser.add_argument("--name", default="allocator", help="base name of the result files")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs = args.epochs or (5 if args.quick else 10)
    if args.child:
        print(json.dumps(child(bool(args.reuse), args.precision[0], args.threads, epochs)))
        return
    C.setup(args)
    repeats = args.repeats or (3 if args.quick else 4)
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for precision in args.precision:
        for repeat in range(repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for reuse in order:
                cmd = [C.python_exe(), __file__, "--child", "--reuse", str(int(reuse)),
                       "--precision", precision, "--threads", str(args.threads),
                       "--epochs", str(epochs)]
                result = C.run_json_child(cmd, args.threads, f"{precision}, reuse={reuse}")
                runs.setdefault((precision, reuse), []).append(result)
                print(f"[{args.name}] {precision}, {SETTINGS[reuse]}: "
                      f"{result['wall_ms']:.1f} ms per {BATCH_SIZE} cells, "
                      f"{result['faults_per_step']:.0f} faults per step", flush=True)
    table = C.Table(args.name, "Training with and without reuse of freed memory", [
        C.Column("precision", "precision"), C.Column("allocator", "allocator"),
        C.Column("applied", "settings in effect"),
        C.Column("wall_ms", f"wall ms per {BATCH_SIZE} cells", C.fmt_float(1)),
        C.Column("user_ms", "user CPU ms", C.fmt_float(1)),
        C.Column("sys_ms", "system CPU ms", C.fmt_float(2)),
        C.Column("faults", "page faults per step", C.fmt_int),
        C.Column("peak_rss", "peak RSS (MiB)", C.fmt_int),
        C.Column("speedup", "rate vs glibc's defaults", C.fmt_ratio)])
    for precision in args.precision:
        base = statistics.median(r["wall_ms"] for r in runs[(precision, False)])
        for reuse in (False, True):
            rows = runs[(precision, reuse)]
            wall = statistics.median(r["wall_ms"] for r in rows)
            table.add(precision=rows[0]["precision"], allocator=SETTINGS[reuse],
                      applied=str(all(r["reuse"] for r in rows)) if reuse else "",
                      wall_ms=wall,
                      user_ms=statistics.median(r["user_ms"] for r in rows),
                      sys_ms=statistics.median(r["sys_ms"] for r in rows),
                      faults=statistics.median(r["faults_per_step"] for r in rows),
                      peak_rss=statistics.median(r["peak_rss"] for r in rows) / 2**20,
                      speedup=base / wall)
    table.notes += [
        f"median over {repeats} processes per row, the two settings alternating; "
        f"{epochs} measured epochs of the 700 PBMCs after 2 of warm-up; "
        f"{args.threads} torch thread(s)",
        "rate vs glibc's defaults: wall time per cell of the defaults over that of the row"]
    info = C.machine(args)
    C.write_report(args.name, "Reuse of freed memory in CPU training", C.doc_intro(__doc__),
                   [table], info, args.out,
                   extra_json={"runs": {f"{p}/{SETTINGS[r]}": v for (p, r), v in runs.items()}})


if __name__ == "__main__":
    main()
