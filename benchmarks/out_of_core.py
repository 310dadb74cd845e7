"""Training and embedding from counts on disk versus counts in memory, up to millions of
cells: peak memory, speed, data-parallel reading and embedding quality.

For each size, synthetic counts (2,000 genes, 5 % non-zero) are generated in chunks of
100,000 cells and appended to an ``.h5ad`` file and a ``.zarr`` store, so the whole
matrix is never in memory (``benchmarks/_synthetic_store.py``). Then, each in a fresh
Python process,

1. training: open the data (``anndata.read_h5ad`` + ``ScDataset`` in memory, up to
   ``--memory-max`` cells; ``OnDiskDataset``, which scans the file once for totals and
   count checks, from disk), read ``--read-steps`` batches of 128 cells without a model,
   then train the TranscriptFormer at this package's defaults for ``--steps`` steps
   (``Trainer.train_batch(..., steps_per_epoch=...)``);
2. embedding: stream the embedding of the first ``--embed-cells`` cells into an
   ``.h5ad`` file with :func:`step.utils.embed_to_h5ad` (batches of 1,024 cells);
3. data-parallel (at ``--ddp-size`` cells): 1 process, then 2 processes under
   ``torchrun`` (gloo) train ``--ddp-steps`` steps each from the ``.h5ad`` store with
   block shuffling; each process records its peak RSS, speed and the rows it read.

Peak RSS is ``resource.getrusage`` of the process (torch and step imports included).
Disk reads use block shuffling (``block_size=64, buffer_blocks=16``: at most 17
contiguous ranges per batch) unless the row says random; the loader then has the dataset
read whole aligned blocks of 64 rows and keep a buffer's worth in memory, so each block
is read from disk once per pass (with one process; under ``torchrun`` every process
reads only its own rows). Finally the embedding quality
of a model trained from disk and the same model trained in memory is compared on the
PBMC counts written to disk (3 seeds; ``benchmarks/_ooc_quality.py``). The files are
deleted after each size.

Usage::

    python benchmarks/out_of_core.py --quick                    # 200k cells
    python benchmarks/out_of_core.py                            # 1M and 5M cells
    python benchmarks/out_of_core.py --sizes 1000000 --no-quality
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

N_GENES = 2000
DENSITY = 0.05
BATCH_SIZE = 128
EMBED_BATCH = 1024
BLOCK = {"block_size": 64, "buffer_blocks": 16}
GiB = C.GiB

#: name -> (file suffix, label, loader options)
MODES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "memory": (".h5ad", "in memory (read_h5ad + ScDataset), random batches", {}),
    "h5ad-random": (".h5ad", "h5ad on disk, random batches", {}),
    "h5ad-block": (".h5ad", "h5ad on disk, block shuffling", BLOCK),
    "zarr-block": (".zarr", "zarr on disk, block shuffling", BLOCK),
}
EMBED_MODES: dict[str, tuple[str, str]] = {
    "memory": (".h5ad", "in memory (read_h5ad + ScDataset)"),
    "h5ad": (".h5ad", "h5ad on disk"),
    "zarr": (".zarr", "zarr on disk"),
}



def write_child(n_cells: int, folder: Path, seed: int) -> dict[str, Any]:
    """Write the counts to ``folder`` (h5ad and zarr) chunk by chunk."""
    from _synthetic_store import store_bytes, write_synthetic_stores

    paths = [folder / "counts.h5ad", folder / "counts.zarr"]
    t = time.perf_counter()
    out = write_synthetic_stores(paths, n_cells, N_GENES, density=DENSITY, seed=seed)
    out.update(write_s=time.perf_counter() - t, write_peak_rss=C.peak_rss(),
               h5ad_bytes=store_bytes(paths[0]), zarr_bytes=store_bytes(paths[1]))
    return out


def _open(mode: str, path: Path) -> Any:
    import anndata as ad

    from step.utils import OnDiskDataset, ScDataset

    return ScDataset(ad.read_h5ad(path)) if mode == "memory" else OnDiskDataset(path)


def train_child(mode: str, folder: Path, steps: int, read_steps: int, device: str,
                seed: int) -> dict[str, Any]:
    """One way of reading the data for training, measured inside a fresh process."""
    from step.functionality.comps.trainer import Trainer
    from step.models import TranscriptFormer
    from step.utils import index_loader

    suffix, _, options = MODES[mode]
    out: dict[str, Any] = {"mode": mode, "peak_import": C.peak_rss()}
    t = time.perf_counter()
    dataset = _open(mode, folder / f"counts{suffix}")
    out["open_s"] = time.perf_counter() - t
    out["peak_open"] = C.peak_rss()

    loader = index_loader(dataset, BATCH_SIZE, seed=seed, **options)
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(loader):
        n += int(batch["x"].shape[0])
        if i + 1 == read_steps:
            break
    out["read_cells_per_s"] = n / (time.perf_counter() - t)

    model = TranscriptFormer(dataset.n_genes, **C.OUR_DEFAULTS)
    trainer = Trainer(model, device=device, seed=seed, verbose=False, distributed=False)
    trainer.init_optimizer(lr=1e-3)
    loader = index_loader(dataset, BATCH_SIZE, seed=seed, **options)
    t = time.perf_counter()
    trainer.train_batch(1, (loader, None), steps_per_epoch=steps)
    out["train_cells_per_s"] = steps * BATCH_SIZE / (time.perf_counter() - t)
    out["peak_rss"] = C.peak_rss()
    return out


def embed_child(mode: str, folder: Path, n_embed: int, device: str, seed: int
                ) -> dict[str, Any]:
    """Stream the embedding of the first ``n_embed`` cells into a result file."""
    import numpy as np
    import torch

    from step.models import TranscriptFormer
    from step.utils import embed_to_h5ad

    torch.manual_seed(seed)
    suffix = EMBED_MODES[mode][0]
    out: dict[str, Any] = {"mode": mode}
    t = time.perf_counter()
    dataset = _open(mode, folder / f"counts{suffix}")
    out["open_s"] = time.perf_counter() - t
    out["peak_open"] = C.peak_rss()
    n_embed = min(n_embed, len(dataset))
    cells = dataset.subset(np.arange(n_embed)) if n_embed < len(dataset) else dataset
    model = TranscriptFormer(dataset.n_genes, **C.OUR_DEFAULTS).to(device)
    target = folder / f"embedding-{mode}.h5ad"
    t = time.perf_counter()
    embed_to_h5ad(model, cells, target, batch_size=EMBED_BATCH)
    out.update(embed_cells=n_embed, embed_cells_per_s=n_embed / (time.perf_counter() - t),
               peak_rss=C.peak_rss(), result_bytes=target.stat().st_size)
    target.unlink()
    return out




def _tables() -> dict[str, C.Table]:
    return {
        "write": C.Table("out_of_core_write", "Writing the synthetic stores in chunks", [
            C.Column("n_cells", "cells", C.fmt_int),
            C.Column("nnz", "non-zeros", C.fmt_int),
            C.Column("write_s", "write s (both formats)", C.fmt_float(0)),
            C.Column("write_peak_rss", "writer peak RSS GiB", C.gib),
            C.Column("h5ad_bytes", "h5ad GiB", C.gib),
            C.Column("zarr_bytes", "zarr GiB", C.gib),
        ]),
        "train": C.Table("out_of_core", "Training from disk versus from memory", [
            C.Column("n_cells", "cells", C.fmt_int),
            C.Column("label", "data", "{}"),
            C.Column("open_s", "open s", C.fmt_float(1)),
            C.Column("peak_open", "peak RSS after open GiB", C.gib),
            C.Column("read_cells_per_s", "read cells/s", C.fmt_float(0)),
            C.Column("train_cells_per_s", "train cells/s", C.fmt_float(0)),
            C.Column("vs_memory", "train vs memory", C.fmt_ratio),
            C.Column("peak_rss", "peak RSS GiB", C.gib),
        ]),
        "embed": C.Table("out_of_core_embed", "Streaming embedding into an .h5ad file", [
            C.Column("n_cells", "cells in the data", C.fmt_int),
            C.Column("label", "data", "{}"),
            C.Column("embed_cells", "cells embedded", C.fmt_int),
            C.Column("open_s", "open s", C.fmt_float(1)),
            C.Column("embed_cells_per_s", "embed cells/s", C.fmt_float(0)),
            C.Column("vs_memory", "vs memory", C.fmt_ratio),
            C.Column("peak_rss", "peak RSS GiB", C.gib),
        ]),
        "ddp": C.Table("out_of_core_ddp", "Data-parallel training from the on-disk store", [
            C.Column("n_cells", "cells", C.fmt_int),
            C.Column("processes", "processes"),
            C.Column("rank", "rank"),
            C.Column("rows_read", "rows read", C.fmt_int),
            C.Column("cells_per_s", "cells/s (this process)", C.fmt_float(0)),
            C.Column("vs_one", "vs 1 process", C.fmt_ratio),
            C.Column("peak_rss", "peak RSS GiB", C.gib),
            C.Column("disjoint", "ranks read disjoint rows"),
        ]),
        "quality": C.Table("out_of_core_quality", "PBMC embedding: trained from disk vs in memory", [
            C.Column("seed", "seed"),
            C.Column("where", "trained"),
            C.Column("ari", "ARI (Leiden 0.5)", C.fmt_float(3)),
            C.Column("n_clusters", "clusters"),
            C.Column("max_abs_diff", "max |disk - memory| of X_rep", "{:.2e}"),
        ]),
    }


def _measure_size(n: int, args: Any, base: list[str], tables: dict[str, C.Table]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="step-ooc-", dir=args.tmp))
    try:
        print(f"{n:,} cells: writing to {folder}", flush=True)
        written = C.run_json_child([*base, "--write", str(n), "--folder", str(folder)], args.threads,
                       f"writing {n:,} cells")
        tables["write"].add(n_cells=n, **written)
        print(f"{n:,} cells: {shutil.disk_usage(folder).free / GiB:.0f} GiB free", flush=True)
        memory = n <= args.memory_max
        base_rate = None
        for mode in [m for m in args.modes if memory or m != "memory"]:
            print(f"{n:,} cells: training, {mode}", flush=True)
            row = C.run_json_child([*base, "--child", mode, "--folder", str(folder), "--steps",
                        str(args.steps), "--read-steps", str(args.read_steps)],
                       args.threads, f"{mode} at {n:,} cells")
            base_rate = row["train_cells_per_s"] if mode == "memory" else base_rate
            ratio = row["train_cells_per_s"] / base_rate if base_rate else None
            tables["train"].add(n_cells=n, label=MODES[mode][1], vs_memory=ratio, **row)
        base_rate = None
        for mode in [m for m in EMBED_MODES if memory or m != "memory"]:
            print(f"{n:,} cells: embedding, {mode}", flush=True)
            row = C.run_json_child([*base, "--embed", mode, "--folder", str(folder), "--embed-cells",
                        str(args.embed_cells)], args.threads, f"embedding {mode} at {n:,}")
            base_rate = row["embed_cells_per_s"] if mode == "memory" else base_rate
            ratio = row["embed_cells_per_s"] / base_rate if base_rate else None
            tables["embed"].add(n_cells=n, label=EMBED_MODES[mode][1], vs_memory=ratio, **row)
        if n == args.ddp_size:
            _measure_ddp(n, folder / "counts.h5ad", args.ddp_steps, tables["ddp"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure_ddp(n: int, path: Path, steps: int, table: C.Table) -> None:
    from _ooc_parallel import launch

    one = None
    for processes in (1, 2):
        print(f"{n:,} cells: {processes} process(es) under torchrun", flush=True)
        res = launch(processes, path, steps)
        for rank in res["ranks"]:
            one = rank["cells_per_s"] if processes == 1 else one
            table.add(n_cells=n, processes=processes, rank=rank["rank"],
                      rows_read=rank["rows_read"], cells_per_s=rank["cells_per_s"],
                      vs_one=rank["cells_per_s"] / one, peak_rss=rank["peak_rss"],
                      disjoint="yes" if res["disjoint"] and res["own_share_only"] else "NO")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = C.base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="cell counts (default: 1000000 5000000; 200000 with --quick)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--read-steps", type=int, default=200, help="batches read per run")
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        default=["memory", "h5ad-block", "zarr-block"])
    parser.add_argument("--memory-max", type=int, default=1_000_000,
                        help="largest size also run in memory (default: %(default)s)")
    parser.add_argument("--embed-cells", type=int, default=100_000,
                        help="cells embedded per embedding run (default: %(default)s)")
    parser.add_argument("--ddp-size", type=int, default=None,
                        help="size trained under torchrun (default: the smallest size)")
    parser.add_argument("--ddp-steps", type=int, default=40,
                        help="training steps of each process under torchrun")
    parser.add_argument("--quality-epochs", type=int, default=40,
                        help="training epochs of each PBMC quality run")
    parser.add_argument("--no-quality", action="store_true", help="skip the PBMC runs")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the data files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--embed", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        print(json.dumps(write_child(args.write, args.folder, args.seed)))
        return
    if args.child or args.embed:
        import torch

        torch.set_num_threads(args.threads)
        row = (train_child(args.child, args.folder, args.steps, args.read_steps, args.device,
                           args.seed) if args.child else
               embed_child(args.embed, args.folder, args.embed_cells, args.device, args.seed))
        print(json.dumps(row))
        return
    C.setup(args)
    info = C.machine(args)
    sizes = args.sizes or ([200_000] if args.quick else [1_000_000, 5_000_000])
    args.ddp_size = args.ddp_size or min(sizes)
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
            "--seed", str(args.seed), "--device", args.device]
    tables = _tables()
    started = time.perf_counter()
    for n in sizes:
        _measure_size(n, args, base, tables)
    if not args.no_quality:
        from _ooc_quality import compare

        for seed in (0, 1, 2):
            print(f"PBMC quality, seed {seed}", flush=True)
            for row in compare(seed, args.quality_epochs):
                tables["quality"].add(**row)
    _add_notes(tables, args, time.perf_counter() - started)
    kept = [t for t in tables.values() if t.rows]
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    C.write_report("out_of_core", "Out-of-core training and embedding", intro, kept, info,
                   args.out)


def _add_notes(tables: dict[str, C.Table], args: Any, seconds: float) -> None:
    tables["write"].notes.append(
        "chunks of 100,000 cells, each from step.datasets.synthetic_counts with its own "
        "seed; CSR arrays stored in chunks of 65,536 elements (zarr: Blosc lz4).")
    tables["train"].notes += [
        f"{N_GENES:,} genes, {DENSITY:.0%} non-zero; TranscriptFormer {C.OUR_DEFAULTS}; "
        f"batch {BATCH_SIZE}; fp32; {args.steps} training steps and {args.read_steps} "
        "batches read per run, each run a fresh process; in memory up to "
        f"{args.memory_max:,} cells.",
        "files on the local disk, page cache warm after writing (reads are mostly from "
        "memory; a cold or network disk is slower).",
        f"whole benchmark: {seconds / 60:.0f} minutes.",
    ]
    tables["embed"].notes.append(
        f"untrained model of the same size; embed_to_h5ad over the first "
        f"{args.embed_cells:,} cells in batches of {EMBED_BATCH:,}; the dataset over all "
        "cells is open (per-cell totals and row pointers in memory); obs copied file to "
        "file into the result, which is deleted after.")
    tables["ddp"].notes.append(
        f"{args.ddp_steps} steps of {BATCH_SIZE} cells per process from the .h5ad store, "
        "block shuffling, gloo, one torch thread per process; 'rows read' counts the "
        "positions each process gathered from disk; disjoint: no row read by two "
        "processes and no process read more than its own steps.")
    tables["quality"].notes.append(
        f"scModel defaults, {args.quality_epochs} epochs, batch 128; kNN k = 15, Leiden "
        "resolution 0.5 (igraph, random_state = seed); ARI against bulk_labels.")


if __name__ == "__main__":
    main()
