"""Training throughput of the single-cell TranscriptFormer, side by side with step-kit 0.3.

Steady-state cells per second of ``Trainer.train_batch`` epochs (batch size 128, no
validation loader, Adam at 1e-3, KL weight 0.01) on the PBMC counts shipped with the
package and on synthetic sparse counts (2,000 genes, 5 % non-zero). The first epoch is
excluded; epoch boundaries are the end of the last optimizer step of each epoch, taken
the same way for both tools. Rows:

- ``step``, 3 layers / 8 heads: the architecture of the public STEP release (hidden 64,
  32 modules of size 30, ZINB), fp32;
- ``step``, 2 layers / 4 heads: the sizes above with this package's transformer defaults;
- ``step``, both sizes under bf16 autocast (``Trainer(precision="bf16")``);
- with ``--precision auto``, ``step`` at both sizes with ``Trainer(precision="auto")``:
  bf16 where the machine computes it natively, fp32 elsewhere (the row says which);
- ``step-kit 0.3``: its ``scModel(...).run()`` with the same sizes, data and batch size,
  run by ``benchmarks/peers/stepkit_driver.py`` in its own environment.

The ratio column divides each row by the step-kit row of the same data, measured in the
same run. A GEMM probe (GFLOP/s of a 512³ fp32 product) is taken before every row; a low
value flags a row measured while other work ran on the machine.

Usage::

    python benchmarks/throughput.py --quick             # PBMC + 10k cells
    python benchmarks/throughput.py --threads 1         # PBMC, 10k and 100k cells
    python benchmarks/throughput.py --quick --precision auto
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

from step.datasets import pbmc68k_counts, synthetic_counts
from step.functionality.comps.trainer import Trainer
from step.functionality.comps.trainer._device import resolve_device, resolve_precision
from step.models import TranscriptFormer
from step.utils.dataset import ScDataset, index_loader

BATCH_SIZE = 128
LR = 1e-3
KL_WEIGHT = 1e-2  # step-kit's default beta for single-cell training
EPOCHS = {"pbmc": 6, "synthetic-10k": 3, "synthetic-100k": 2}
QUICK_EPOCHS = {"pbmc": 4, "synthetic-10k": 2}


def load(name: str, seed: int):
    if name == "pbmc":
        return pbmc68k_counts()
    n = {"synthetic-10k": 10_000, "synthetic-100k": 100_000}[name]
    return synthetic_counts(n, 2000, density=0.05, seed=seed)


def epoch_rates(times: list[float], start: float, n_cells: int, steps_per_epoch: int,
                epochs: int) -> dict[str, Any]:
    """Per-epoch seconds from step timestamps, and the steady rate (first epoch excluded)."""
    if len(times) != steps_per_epoch * epochs:
        msg = f"expected {steps_per_epoch * epochs} steps, recorded {len(times)}"
        raise RuntimeError(msg)
    ends = [times[(e + 1) * steps_per_epoch - 1] for e in range(epochs)]
    seconds = [ends[0] - start] + [b - a for a, b in zip(ends[:-1], ends[1:])]
    steady = sum(seconds[1:])
    return {"epoch_seconds": seconds, "first_epoch_s": seconds[0],
            "steady_epoch_s": steady / (epochs - 1), "cells_per_s": n_cells * (epochs - 1) / steady}


def train_ours(adata, arch: dict[str, Any], *, precision: str | None, epochs: int,
               device: str, seed: int) -> dict[str, Any]:
    dataset = ScDataset(adata)
    model = TranscriptFormer(dataset.n_genes, kl_weight=KL_WEIGHT,
                             **{k: v for k, v in arch.items()})
    clock = C.StepClock(device)
    trainer = Trainer(model, device=device, seed=seed, precision=precision, verbose=False,
                      callbacks=[clock], distributed=False)
    trainer.init_optimizer(lr=LR)
    loader = index_loader(dataset, BATCH_SIZE, shuffle=True, seed=seed)
    start = time.perf_counter()
    trainer.train_batch(epochs, (loader, None))
    out = epoch_rates(clock.times, start, len(dataset), len(loader), epochs)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    last = trainer.history.iloc[-1]
    out["final_recon_loss"] = float(last["recon_loss"])
    return out


def run_stepkit(args, h5ad: Path, epochs: int, tmp: Path) -> dict[str, Any]:
    info = C.run_stepkit(args, h5ad, "throughput", tmp / "stepkit_throughput.json",
                         ["--epochs", epochs, "--batch-size", BATCH_SIZE, "--lr", LR,
                          "--beta", KL_WEIGHT])
    return {"cells_per_s": info["cells_per_s"], "first_epoch_s": info["first_epoch_seconds"],
            "steady_epoch_s": info["steady_epoch_seconds_mean"],
            "epoch_seconds": info["epoch_seconds"], "n_params": info["n_params"],
            "final_recon_loss": (info.get("final_loss") or {}).get("recon_loss"),
            "version": info["version"]}


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=sorted(EPOCHS),
                        help="data sets to run (default: pbmc and synthetic-10k with "
                             "--quick, all three otherwise)")
    parser.add_argument("--epochs", type=int, help="epochs per run (at least 2), for all data")
    parser.add_argument("--name", default="throughput",
                        help="base name of the result files (default: throughput), e.g. to "
                             "keep the tables of several machines or thread counts")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows (in "
                        "--quick mode they run on the PBMC counts only)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every row this many times, in alternating order (forward, "
                             "then backward), and report the median (default: 1); on a "
                             "shared machine this evens out slow and fast periods")
    parser.add_argument("--precision", choices=["auto"], help="also run rows with "
                        "Trainer(precision='auto') (bf16 only where it is native)")
    args = parser.parse_args(argv)
    C.setup(args)
    table_epochs = QUICK_EPOCHS if args.quick else EPOCHS
    names = args.datasets or list(table_epochs)
    info = C.machine(args)

    table = C.Table(args.name, "Training throughput (cells/s), first epoch excluded", [
        C.Column("dataset", "data"),
        C.Column("n_cells", "cells", C.fmt_int),
        C.Column("n_genes", "genes", C.fmt_int),
        C.Column("tool", "tool"),
        C.Column("architecture", "architecture"),
        C.Column("precision", "precision"),
        C.Column("epochs", "epochs (measured)", lambda v: f"{v[0]} ({v[1]})"),
        C.Column("steady_epoch_s", "s/epoch", C.fmt_float(2)),
        C.Column("cells_per_s", "cells/s", C.fmt_float(0)),
        C.Column("cells_per_s_range", "cells/s, lowest-highest repeat"),
        C.Column("ratio", "ours/theirs", C.fmt_ratio),
        C.Column("probe_gflops", "GEMM probe GFLOP/s", C.fmt_float(0)),
    ])
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="step-throughput-") as tmpdir:
        tmp = Path(tmpdir)
        for name in names:
            epochs = args.epochs or table_epochs.get(name, 2)
            if epochs < 2:
                raise SystemExit("--epochs must be >= 2: the first epoch is excluded")
            adata = load(name, args.seed)
            base = {"dataset": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars,
                    "epochs": (epochs, epochs - 1)}
            h5ad = C.write_counts_h5ad(adata, tmp / f"{name}.h5ad")
            # (tool, architecture, precision label, precision or "stepkit")
            runs: list[tuple[str, str, str, Any]] = [
                ("step", "same", "fp32", None),
                ("step-kit", "same", "fp32", "stepkit"),
                ("step", "defaults", "fp32", None),
            ]
            if not args.no_bf16 and (name == "pbmc" or not args.quick):
                runs += [
                    ("step", "same", "bf16 autocast", "bf16"),
                    ("step", "defaults", "bf16 autocast", "bf16"),
                ]
            if args.precision == "auto":
                chosen = resolve_precision("auto", None, resolve_device(args.device))
                runs += [("step", arch, f"auto ({chosen})", "auto")
                         for arch in ("same", "defaults")]
            measured: dict[int, list[tuple[str, float, dict[str, Any]]]] = {}
            for repeat in range(args.repeats):
                order = list(enumerate(runs))
                for index, (tool, arch, precision, how) in order[::1 if repeat % 2 == 0 else -1]:
                    print(f"[{name}] {tool}, {C.ARCH_LABELS[arch]}, {precision}: {epochs} "
                          f"epochs (repeat {repeat + 1} of {args.repeats})", flush=True)
                    gc.collect()
                    probe = C.load_probe(args.device)
                    try:
                        if how == "stepkit":
                            result = run_stepkit(args, h5ad, epochs, tmp)
                            tool = f"step-kit {result.pop('version')}"
                        else:
                            result = train_ours(adata, C.SAME_ARCH if arch == "same" else
                                                C.OUR_DEFAULTS, precision=how, epochs=epochs,
                                                device=args.device, seed=args.seed)
                    except C.StepkitUnavailable as err:
                        skipped.append(f"step-kit rows skipped: {err}")
                        continue
                    measured.setdefault(index, []).append((tool, probe, result))
            rows = []
            for index, (_, arch, precision, _) in enumerate(runs):
                if index not in measured:
                    continue
                by_rate = sorted(measured[index], key=lambda item: item[2]["cells_per_s"])
                tool, probe, result = by_rate[(len(by_rate) - 1) // 2]  # the median repeat
                rates = [item[2]["cells_per_s"] for item in by_rate]
                rows.append(table.add(**base, tool=tool, architecture=C.ARCH_LABELS[arch],
                                      precision=precision, probe_gflops=probe,
                                      cells_per_s_range=f"{rates[0]:,.0f}-{rates[-1]:,.0f}",
                                      **result))
            theirs = [r for r in rows if r["tool"].startswith("step-kit")]
            for row in rows:
                row["ratio"] = (row["cells_per_s"] / theirs[0]["cells_per_s"]) if theirs \
                    else None
            del adata
    table.notes = [
        "ratio: cells/s of the row over that of step-kit on the same data in the same run "
        "(target: at least 3× for the same architecture).",
        f"repeats: {args.repeats}; every row ran that many times, in alternating order, and "
        "shows its median repeat (the lower middle one for an even number).",
        f"batch size {BATCH_SIZE}, Adam lr {LR}, KL weight {KL_WEIGHT}; one epoch = one pass "
        "over all cells; no validation split.",
        "GEMM probe: fp32 512×512×512 product rate just before the row; lower values mean "
        "the machine was busier.",
        *sorted(set(skipped)),
    ]
    intro = C.doc_intro(__doc__) + (
        f"\n\nThreads: {args.threads} for both tools (the machine is shared, so use one "
        "thread per process for a fair comparison of the two tools).")
    C.write_report(args.name, "Training throughput", intro, [table], info, args.out)


if __name__ == "__main__":
    main()
