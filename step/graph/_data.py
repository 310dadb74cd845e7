"""The graph container returned by section splitting and by the samplers."""

from __future__ import annotations

from typing import Any

from torch_geometric.data import Data


class GraphData(Data):
    """A :class:`torch_geometric.data.Data` whose ``node_index`` holds global ids.

    torch-geometric shifts every attribute whose name contains ``"index"`` by
    the number of nodes of the preceding graphs when it batches graphs. That
    is right for ``edge_index`` but would corrupt ``node_index``, which points
    into the full dataset; this class keeps ``node_index`` unchanged, so a
    batch of several section graphs still maps each node to its dataset row.
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "node_index":
            return 0
        return super().__inc__(key, value, *args, **kwargs)
