"""Training from counts on disk versus counts in memory: peak memory and speed.

For each size, synthetic counts (``step.datasets.synthetic_counts``: 2,000 genes, 5 %
non-zero) are generated once and written to a temporary ``.h5ad`` file and ``.zarr``
store. Then, for each way of reading them, a fresh Python process

1. opens the data: ``anndata.read_h5ad`` + ``ScDataset`` (memory), or
   ``OnDiskDataset`` on the file (which scans it once for totals and count checks),
2. reads ``--read-steps`` batches of 128 cells from an index loader without a model
   (the data loading rate),
3. trains the TranscriptFormer at this package's defaults for ``--steps`` steps of 128
   cells with ``Trainer.train_batch(..., steps_per_epoch=...)``,

recording the time of each stage and the process's peak RSS (``resource.getrusage``).
Random batches read one range per cell from disk; block shuffling
(``index_loader(..., block_size=64, buffer_blocks=16)``) reads at most 17 ranges per batch.

Usage::

    python benchmarks/out_of_core.py --quick        # 200k cells
    python benchmarks/out_of_core.py                # 200k and 1M cells
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

N_GENES = 2000
DENSITY = 0.05
BATCH_SIZE = 128
BLOCK = {"block_size": 64, "buffer_blocks": 16}
GiB = 2**30

#: name -> (file suffix, label, loader options)
MODES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "memory": (".h5ad", "in memory (read_h5ad + ScDataset), random batches", {}),
    "h5ad-random": (".h5ad", "h5ad on disk, random batches", {}),
    "h5ad-block": (".h5ad", "h5ad on disk, block shuffling", BLOCK),
    "zarr-block": (".zarr", "zarr on disk, block shuffling", BLOCK),
}


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_child(n_cells: int, folder: Path, seed: int) -> dict[str, Any]:
    """Generate the counts and write them to ``folder`` (h5ad and zarr)."""
    import warnings

    from step.datasets import synthetic_counts

    t = time.perf_counter()
    adata = synthetic_counts(n_cells, N_GENES, density=DENSITY, seed=seed)
    out = {"generate_s": time.perf_counter() - t, "nnz": int(adata.X.nnz)}
    t = time.perf_counter()
    adata.write_h5ad(folder / "counts.h5ad")
    out["write_h5ad_s"] = time.perf_counter() - t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(folder / "counts.zarr")
    out["h5ad_bytes"] = (folder / "counts.h5ad").stat().st_size
    return out


def child(mode: str, folder: Path, steps: int, read_steps: int, device: str, threads: int,
          seed: int) -> dict[str, Any]:
    """One way of reading the data, measured inside a fresh process."""
    import anndata as ad
    import torch

    torch.set_num_threads(threads)
    from step.functionality.comps.trainer import Trainer
    from step.models import TranscriptFormer
    from step.utils import OnDiskDataset, ScDataset, index_loader

    suffix, _, options = MODES[mode]
    path = folder / f"counts{suffix}"
    out: dict[str, Any] = {"mode": mode, "peak_import": _peak()}
    t = time.perf_counter()
    dataset = ScDataset(ad.read_h5ad(path)) if mode == "memory" else OnDiskDataset(path)
    out["open_s"] = time.perf_counter() - t
    out["peak_open"] = _peak()

    loader = index_loader(dataset, BATCH_SIZE, seed=seed, **options)
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(loader):
        n += int(batch["x"].shape[0])
        if i + 1 == read_steps:
            break
    out["read_cells_per_s"] = n / (time.perf_counter() - t)

    model = TranscriptFormer(dataset.n_genes)
    trainer = Trainer(model, device=device, seed=seed, verbose=False, distributed=False)
    trainer.init_optimizer(lr=1e-3)
    loader = index_loader(dataset, BATCH_SIZE, seed=seed, **options)
    t = time.perf_counter()
    trainer.train_batch(1, (loader, None), steps_per_epoch=steps)
    out["train_cells_per_s"] = steps * BATCH_SIZE / (time.perf_counter() - t)
    out["peak_rss"] = _peak()
    return out


def _run(cmd: list[str], threads: int, what: str) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=C.child_env(threads))
    if proc.returncode != 0:
        msg = f"{what} failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def gib(value: Any) -> str:
    return f"{float(value) / GiB:.2f}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = C.base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="cell counts (default: 200000, and 1000000 without --quick)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--read-steps", type=int, default=200, help="batches read per run")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the data files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        print(json.dumps(write_child(args.write, args.folder, args.seed)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.read_steps,
                               args.device, args.threads, args.seed)))
        return
    C.setup(args)
    info = C.machine(args)
    sizes = args.sizes or ([200_000] if args.quick else [200_000, 1_000_000])
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
            "--seed", str(args.seed), "--device", args.device]

    table = C.Table("out_of_core", "Training from disk versus from memory", [
        C.Column("n_cells", "cells", C.fmt_int),
        C.Column("label", "data", "{}"),
        C.Column("open_s", "open s", C.fmt_float(1)),
        C.Column("peak_open", "peak RSS after open GiB", gib),
        C.Column("read_cells_per_s", "read cells/s", C.fmt_float(0)),
        C.Column("train_cells_per_s", "train cells/s", C.fmt_float(0)),
        C.Column("peak_rss", "peak RSS GiB", gib),
    ])
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix="step-ooc-", dir=args.tmp))
        try:
            print(f"{n:,} cells: writing to {folder}", flush=True)
            written = _run([*base, "--write", str(n), "--folder", str(folder)], args.threads,
                           f"writing {n:,} cells")
            for mode in args.modes:
                print(f"{n:,} cells: {mode} (fresh process)", flush=True)
                row = _run([*base, "--child", mode, "--folder", str(folder), "--steps",
                            str(args.steps), "--read-steps", str(args.read_steps)],
                           args.threads, f"{mode} at {n:,} cells")
                table.add(n_cells=n, label=MODES[mode][1], **written, **row)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    table.notes += [
        f"{N_GENES:,} genes, {DENSITY:.0%} non-zero; model: 2 layers / 4 heads, hidden 64, "
        f"32 modules of size 30, ZINB; batch {BATCH_SIZE}; fp32; {args.steps} training steps "
        f"and {args.read_steps} batches read per run, each run a fresh process.",
        "open: read_h5ad + ScDataset for memory; OnDiskDataset (obs, gene names, one scan "
        "for totals and count checks) for disk. Peak RSS includes torch and step imports.",
        f"block shuffling: blocks of {BLOCK['block_size']} rows, buffers of "
        f"{BLOCK['buffer_blocks']} blocks; files on the local disk (page cache warm after "
        "writing, so reads are mostly from memory; a cold or network disk is slower).",
    ]
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    C.write_report("out_of_core", "Out-of-core training", intro, [table], info, args.out)


if __name__ == "__main__":
    main()
