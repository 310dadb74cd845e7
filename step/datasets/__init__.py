"""Data sets that ship with the package or are generated locally (nothing is downloaded).

- :func:`pbmc68k_counts`: integer counts of the 700 PBMCs shipped with scanpy.
- :func:`spatial_sections_from_cells`: multi-section spatial data with known domains,
  assembled from those cells.
- :func:`spatial_benchmark_case`: named spatial benchmark cases whose domains share cell
  types and differ only in their proportions, assembled from those cells.
- :func:`synthetic_counts`: large random sparse counts for benchmarks.
"""

from __future__ import annotations

from step.datasets._benchmark import SPATIAL_BENCHMARK_CASES, spatial_benchmark_case
from step.datasets._pbmc import pbmc68k_counts
from step.datasets._spatial import spatial_sections_from_cells
from step.datasets._synthetic import synthetic_counts

__all__ = [
    "SPATIAL_BENCHMARK_CASES",
    "pbmc68k_counts",
    "spatial_benchmark_case",
    "spatial_sections_from_cells",
    "synthetic_counts",
]
