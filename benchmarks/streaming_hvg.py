"""Highly variable genes from disk in one streaming pass versus in memory: time, peak
memory and whether the selections agree.

For each size, synthetic counts (``step.datasets.synthetic_counts``: 2,000 genes, 5 %
non-zero) are written once to a temporary ``.h5ad`` file. Then a fresh Python process
per method selects ``--n-top-genes`` genes:

- in memory: ``anndata.read_h5ad`` and ``prepare_counts(n_top_genes=...,
  flavor="seurat")`` (scanpy's ``highly_variable_genes`` on a normalised, log1p copy);
- streaming: ``OnDiskDataset`` on the file (one scan for totals and count checks) and
  ``highly_variable_from_blocks`` over blocks of 8,192 rows (one more pass).

recording the time and the process's peak RSS (``resource.getrusage``), and comparing
the selected genes with the in-memory ones.

Usage::

    python benchmarks/streaming_hvg.py --quick      # 200k cells
    python benchmarks/streaming_hvg.py              # 200k and 500k cells
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
METHODS = {"memory": "in memory (read_h5ad + prepare_counts)",
           "streaming": "from disk, one streaming pass (OnDiskDataset.iter_blocks)"}



def write_child(n_cells: int, folder: Path, seed: int) -> dict[str, Any]:
    from step.datasets import synthetic_counts

    adata = synthetic_counts(n_cells, N_GENES, density=DENSITY, seed=seed)
    adata.write_h5ad(folder / "counts.h5ad")
    return {"h5ad_bytes": (folder / "counts.h5ad").stat().st_size}


def child(method: str, folder: Path, n_top: int) -> dict[str, Any]:
    """Select the genes one way inside a fresh process."""
    import anndata as ad
    import scanpy  # noqa: F401 - imported before the clock starts, as streaming needs none

    from step.utils.ondisk import OnDiskDataset
    from step.utils.preprocess import prepare_counts
    from step.utils.streaming_hvg import highly_variable_from_blocks

    path = folder / "counts.h5ad"
    out: dict[str, Any] = {"method": method, "peak_import": C.peak_rss()}
    t = time.perf_counter()
    if method == "memory":
        genes = list(prepare_counts(ad.read_h5ad(path), n_top_genes=n_top,
                                    flavor="seurat").var_names)
    else:
        dataset = OnDiskDataset(path)
        out["open_s"] = time.perf_counter() - t
        mask = highly_variable_from_blocks(dataset.iter_blocks(), dataset.var_names, n_top)
        genes = list(dataset.var_names[mask])
    out["seconds"] = time.perf_counter() - t
    out["peak_rss"] = C.peak_rss()
    out["genes"] = genes
    return out




def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = C.base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="cell counts (default: 200000, and 500000 without --quick)")
    parser.add_argument("--n-top-genes", type=int, default=500)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the data file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        print(json.dumps(write_child(args.write, args.folder, args.seed)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.n_top_genes)))
        return
    C.setup(args)
    info = C.machine(args)
    sizes = args.sizes or ([200_000] if args.quick else [200_000, 500_000])
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
            "--seed", str(args.seed), "--n-top-genes", str(args.n_top_genes)]
    table = C.Table("streaming_hvg", "Highly variable genes: streaming from disk vs in memory", [
        C.Column("n_cells", "cells", C.fmt_int),
        C.Column("label", "method", "{}"),
        C.Column("seconds", "seconds", C.fmt_float(1)),
        C.Column("time_ratio", "time / in memory", C.fmt_ratio),
        C.Column("peak_rss", "peak RSS GiB", C.gib),
        C.Column("rss_ratio", "peak RSS / in memory", C.fmt_ratio),
        C.Column("same", "same genes as in memory", "{}"),
    ])
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix="step-hvg-", dir=args.tmp))
        try:
            print(f"{n:,} cells: writing to {folder}", flush=True)
            written = C.run_json_child([*base, "--write", str(n), "--folder", str(folder)], args.threads,
                           f"writing {n:,} cells")
            rows = {}
            for method in METHODS:
                print(f"{n:,} cells: {method} (fresh process)", flush=True)
                rows[method] = C.run_json_child([*base, "--child", method, "--folder", str(folder)],
                                    args.threads, f"{method} at {n:,} cells")
            reference = rows["memory"]["genes"]
            for method, row in rows.items():
                genes = row.pop("genes")
                shared = len(set(genes) & set(reference))
                order = "same order" if genes == reference else "other order"
                table.add(n_cells=n, label=METHODS[method], **written, **row,
                          time_ratio=row["seconds"] / rows["memory"]["seconds"],
                          rss_ratio=row["peak_rss"] / rows["memory"]["peak_rss"],
                          same=f"{shared} of {len(genes)}, {order}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    table.notes += [
        f"{N_GENES:,} genes, {DENSITY:.0%} non-zero, {args.n_top_genes} genes selected, one "
        "batch; each method a fresh process; peak RSS includes the torch and step imports.",
        "in memory: scanpy is imported before timing; the time includes the first call's "
        "numba compilation in scanpy.",
        "streaming: the time includes opening the file (a scan for totals and count checks) "
        "and the selection pass; the page cache is warm after writing the file.",
    ]
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    C.write_report("streaming_hvg", "Streaming gene selection", intro, [table], info, args.out)


if __name__ == "__main__":
    main()
