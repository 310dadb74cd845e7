"""How graph construction and sub-graph sampling scale with the number of spots.

For each graph size the script lays out jittered square grids (one per
section, randomly rotated and shifted), builds the spatial graph, compresses it
for a :class:`step.graph.NeighborSampler`, and times sampler steps at a fixed
batch size and fan-out. Warm-up steps are excluded and the median of the
remaining steps is reported, with its ratio to the smallest graph (a flat
ratio means the cost of a step does not grow with the graph).

Usage::

    python benchmarks/graph_scale.py            # 10k, 100k, 1M spots
    python benchmarks/graph_scale.py --quick    # 10k, 100k spots

Results are printed and written to ``benchmarks/results/graph_scale.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from step.graph import NeighborSampler, build_spatial_graph

FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
COLUMNS = (
    "n_spots",
    "n_sections",
    "n_edges",
    "build_s",
    "sampler_init_s",
    "step_ms",
    "step_ratio",
    "nodes_per_step",
    "edges_per_step",
)

LABELS = {
    "n_spots": "spots",
    "n_sections": "sections",
    "n_edges": "edges",
    "build_s": "build s",
    "sampler_init_s": "sampler init s",
    "step_ms": "step ms",
    "step_ratio": "step ratio",
    "nodes_per_step": "nodes/step",
    "edges_per_step": "edges/step",
}


def spatial_coordinates(
    n_spots: int, n_sections: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered, rotated, shifted square grids; one per section, sizes within ±20%."""
    weights = rng.uniform(0.8, 1.2, n_sections)
    sizes = np.floor(weights / weights.sum() * n_spots).astype(int)
    sizes[-1] += n_spots - sizes.sum()
    coords, labels = [], []
    for section, size in enumerate(sizes):
        side = int(np.ceil(np.sqrt(size)))
        idx = np.arange(size)
        grid = np.stack([idx % side, idx // side], axis=1).astype(float) * 100.0
        grid += rng.normal(0.0, 10.0, grid.shape)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        coords.append(grid @ rot.T + rng.uniform(-1e4, 1e4, 2))
        labels.append(np.full(size, section))
    return np.concatenate(coords), np.concatenate(labels)


def _endless(sampler: NeighborSampler) -> Iterator:
    while True:
        yield from sampler


class _Case:
    """One graph size: its graph, its sampler and the timings collected so far."""

    def __init__(
        self,
        n_spots: int,
        *,
        n_sections: int,
        k: int,
        batch_size: int,
        fan_out: tuple[int, ...],
        seed: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        coords, sections = spatial_coordinates(n_spots, n_sections, rng)
        start = time.perf_counter()
        edge_index = build_spatial_graph(coords, sections, method="knn", k=k)
        self.build_s = time.perf_counter() - start
        start = time.perf_counter()
        sampler = NeighborSampler(
            edge_index, n_spots, num_neighbors=fan_out, batch_size=batch_size, seed=seed
        )
        self.init_s = time.perf_counter() - start
        self.n_spots, self.n_sections = n_spots, n_sections
        self.n_edges = int(edge_index.shape[1])
        self._stream = _endless(sampler)
        self.times: list[float] = []
        self.nodes: list[int] = []
        self.edges: list[int] = []

    def step(self, *, record: bool) -> None:
        start = time.perf_counter()
        data = next(self._stream)
        elapsed = time.perf_counter() - start
        if record:
            self.times.append(elapsed)
            self.nodes.append(data.num_nodes)
            self.edges.append(data.edge_index.shape[1])

    def row(self) -> dict[str, float]:
        return {
            "n_spots": self.n_spots,
            "n_sections": self.n_sections,
            "n_edges": self.n_edges,
            "build_s": self.build_s,
            "sampler_init_s": self.init_s,
            "step_ms": 1e3 * statistics.median(self.times),
            "nodes_per_step": statistics.mean(self.nodes),
            "edges_per_step": statistics.mean(self.edges),
        }


def measure(
    sizes: tuple[int, ...],
    *,
    n_sections: int,
    k: int,
    batch_size: int,
    fan_out: tuple[int, ...],
    steps: int,
    warmup: int,
    seed: int,
    console: Console,
) -> list[dict[str, float]]:
    """Time graph construction and sampler steps for every graph size.

    Steps of the different sizes are interleaved (one step of each size per
    round), so a change in machine load affects all sizes alike.
    """
    cases = []
    for n_spots in sizes:
        console.log(f"building the graph of {n_spots:,} spots")
        cases.append(
            _Case(
                n_spots,
                n_sections=n_sections,
                k=k,
                batch_size=batch_size,
                fan_out=fan_out,
                seed=seed,
            )
        )
    console.log(f"timing {steps} steps per size after {warmup} warm-up steps")
    for round_ in range(warmup + steps):
        for case in cases:
            case.step(record=round_ >= warmup)
    rows = [case.row() for case in cases]
    for row in rows:
        row["step_ratio"] = row["step_ms"] / rows[0]["step_ms"]
    return rows


def _fmt(key: str, value: float) -> str:
    if key in ("n_spots", "n_sections", "n_edges"):
        return f"{int(value):,}"
    if key in ("nodes_per_step", "edges_per_step"):
        return f"{value:,.0f}"
    if key == "step_ratio":
        return f"{value:.2f}"
    return f"{value:.3f}" if key == "step_ms" else f"{value:.2f}"


def write_results(rows: list[dict], out_dir: Path, header: str) -> tuple[Path, Path]:
    """Write the rows as CSV and as a Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "graph_scale.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in COLUMNS})
    md_path = out_dir / "graph_scale.md"
    lines = [
        "# Graph construction and neighbour sampling versus graph size",
        "",
        header,
        "",
        "| " + " | ".join(LABELS[key] for key in COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(key, row[key]) for key in COLUMNS) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only 10k and 100k spots")
    parser.add_argument("--sections", type=int, default=8, help="sections per graph")
    parser.add_argument("--k", type=int, default=6, help="nearest neighbours per spot")
    parser.add_argument("--batch-size", type=int, default=512, help="seed nodes per step")
    parser.add_argument(
        "--fan-out", type=int, nargs="+", default=[10, 10], help="neighbours per hop"
    )
    parser.add_argument("--steps", type=int, default=100, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    console = Console(width=120)
    rows = measure(
        sizes,
        n_sections=args.sections,
        k=args.k,
        batch_size=args.batch_size,
        fan_out=tuple(args.fan_out),
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        console=console,
    )

    header = (
        f"kNN graph (k={args.k}) over {args.sections} sections; NeighborSampler with "
        f"batch_size={args.batch_size}, fan-out {args.fan_out}; median of {args.steps} steps "
        f"after {args.warmup} warm-up steps, sizes interleaved; step ratio = step time over that "
        f"of the smallest graph; torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.machine()} CPU; {datetime.now(timezone.utc):%Y-%m-%d}."
    )
    table = Table(title="graph scale", caption=header)
    for key in COLUMNS:
        table.add_column(LABELS[key], justify="right")
    for row in rows:
        table.add_row(*(_fmt(key, row[key]) for key in COLUMNS))
    console.print(table)
    csv_path, md_path = write_results(rows, args.out_dir, header)
    console.print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
