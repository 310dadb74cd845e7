"""Spatial graphs: construction per section, sub-graph sampling and curve row orders.

Graphs are built with scipy k-d trees and sampled in pure torch, so nothing
here needs compiled PyG extensions; ``WITH_PYG_LIB`` and
``WITH_TORCH_CLUSTER`` report whether the optional fast paths are available.
"""

from __future__ import annotations

from step.graph._backends import WITH_PYG_LIB, WITH_TORCH_CLUSTER
from step.graph._data import GraphData
from step.graph.build import (
    build_spatial_graph,
    graph_from_adata,
    lattice_spacing,
    section_graphs,
)
from step.graph.ordering import spatial_order
from step.graph.sampling import NeighborSampler, RandomNodeSampler

__all__ = [
    "WITH_PYG_LIB",
    "WITH_TORCH_CLUSTER",
    "GraphData",
    "NeighborSampler",
    "RandomNodeSampler",
    "build_spatial_graph",
    "graph_from_adata",
    "lattice_spacing",
    "section_graphs",
    "spatial_order",
]
