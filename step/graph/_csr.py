"""Compressed adjacency and the vectorised kernels behind the sub-graph samplers.

The graph is stored by target node (compressed sparse columns): for node ``t``
the sources of its incoming edges are ``src[ptr[t]:ptr[t + 1]]``. Self-loops
are kept out of these lists and remembered in ``has_loop`` so that sampling
draws only real neighbours, while sampled sub-graphs can still carry the
self-loops of the original graph.

No kernel here loops over nodes or edges in Python, and no kernel reads or
writes more than the rows it samples: the per-step cost depends on the batch
size, the fan-outs and the degrees, not on the size of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompressedGraph:
    """A graph in compressed sparse column form.

    Attributes
    ----------
    ptr
        ``int64`` tensor ``(num_nodes + 1,)``: incoming edges of node ``t``
        are at positions ``ptr[t]:ptr[t + 1]`` of ``src``.
    src
        ``int64`` tensor ``(E',)`` of source nodes (self-loops and duplicate
        edges removed), ascending within each target.
    has_loop
        ``bool`` tensor ``(num_nodes,)``: the node has a self-loop.
    num_nodes
        Number of nodes.
    """

    ptr: torch.Tensor
    src: torch.Tensor
    has_loop: torch.Tensor
    num_nodes: int

    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, num_nodes: int) -> CompressedGraph:
        """Compress a checked ``int64`` edge index ``(2, E)`` (source, target)."""
        src, dst = edge_index[0], edge_index[1]
        loop = src == dst
        has_loop = torch.zeros(num_nodes, dtype=torch.bool)
        has_loop[src[loop]] = True
        keys = torch.unique(dst[~loop] * num_nodes + src[~loop])
        dst_sorted = torch.div(keys, num_nodes, rounding_mode="floor")
        src_sorted = keys - dst_sorted * num_nodes
        ptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(dst_sorted, minlength=num_nodes), 0, out=ptr[1:])
        return cls(ptr=ptr, src=src_sorted.contiguous(), has_loop=has_loop, num_nodes=num_nodes)

    def degree(self) -> torch.Tensor:
        """In-degree of every node, self-loops excluded."""
        return self.ptr[1:] - self.ptr[:-1]


class LocalIds:
    """Global-to-local id map reused across steps.

    One ``int64`` buffer of length ``num_nodes`` is allocated once and holds
    ``-1`` everywhere except at the nodes of the sub-graph being assembled;
    :meth:`clear` resets only those positions, so each step touches only the
    ids it samples.
    """

    def __init__(self, num_nodes: int) -> None:
        self._buf = torch.full((num_nodes,), -1, dtype=torch.long)

    def assign(self, ids: torch.Tensor, start: int) -> None:
        """Give the distinct, unassigned ``ids`` the local ids ``start, start + 1, ...``."""
        self._buf[ids] = torch.arange(start, start + ids.numel(), dtype=torch.long)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Local ids of ``ids`` (``-1`` where unassigned)."""
        return self._buf[ids]

    def clear(self, ids: torch.Tensor) -> None:
        """Forget the ids assigned for one sub-graph."""
        self._buf[ids] = -1


def expand_rows(
    graph: CompressedGraph, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten the incoming-edge lists of ``targets`` into one segmented array.

    Returns
    -------
    seg
        For each flattened entry, the position of its target in ``targets``.
    rank
        Position of the entry within its target's list.
    start
        ``ptr`` of every target.
    deg
        Degree of every target.
    """
    start = graph.ptr[targets]
    deg = graph.ptr[targets + 1] - start
    total = int(deg.sum())
    seg = torch.repeat_interleave(torch.arange(targets.numel()), deg, output_size=total)
    first = torch.cumsum(deg, 0) - deg
    rank = torch.arange(total) - first[seg]
    return seg, rank, start, deg


def choose_neighbors(
    graph: CompressedGraph,
    targets: torch.Tensor,
    fan_out: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``fan_out`` distinct in-neighbours of every target.

    Targets with at most ``fan_out`` neighbours keep all of them; for the
    others every neighbour gets a uniform random key and the ``fan_out``
    smallest keys of each target win (one sort over all segments at once),
    which is uniform sampling without replacement.

    Parameters
    ----------
    graph
        The compressed graph.
    targets
        Global ids of the nodes to sample for.
    fan_out
        Most neighbours per target; ``-1`` keeps all.
    generator
        Source of randomness.

    Returns
    -------
    seg
        Position in ``targets`` of each sampled edge's target.
    source
        Global id of each sampled edge's source.
    """
    seg, rank, start, deg = expand_rows(graph, targets)
    if fan_out >= 0 and seg.numel() and int(deg.max()) > fan_out:
        keys = torch.rand(seg.numel(), generator=generator, dtype=torch.float64)
        keys.add_(seg)
        order = torch.sort(keys, stable=True).indices
        # Sorting by (segment, key) keeps each segment's block in place, so a
        # sorted position has the same segment and in-segment rank as before.
        picked = order[rank < fan_out]
        seg, rank = seg[picked], rank[picked]
    return seg, graph.src[start[seg] + rank]


def sample_hops(
    graph: CompressedGraph,
    seeds: torch.Tensor,
    num_neighbors: tuple[int, ...],
    local: LocalIds,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sample a k-hop neighbourhood around distinct ``seeds``.

    Hop ``h`` samples, for every node first reached at hop ``h - 1`` (the
    seeds at hop 1), up to ``num_neighbors[h - 1]`` incoming neighbours.

    Returns
    -------
    node_index
        Global ids of the sampled nodes: seeds first, then new nodes in the
        hop where they were first reached (ascending within a hop).
    edge_index
        Local ``(2, E)`` edges from sampled neighbour to its target, plus a
        self-loop for each sampled node that has one in ``graph``; sorted by
        source then target.
    hop_sizes
        Number of nodes first reached at each hop, the seeds first.
    """
    n_seed = seeds.numel()
    parts = [seeds]
    local.assign(seeds, 0)
    n_nodes = n_seed
    frontier, frontier_start = seeds, 0
    edge_src, edge_dst = [], []
    try:
        for fan_out in num_neighbors:
            if frontier.numel() == 0:
                break
            seg, source = choose_neighbors(graph, frontier, fan_out, generator)
            known = local.lookup(source)
            new = torch.unique(source[known < 0])
            local.assign(new, n_nodes)
            edge_src.append(local.lookup(source))
            edge_dst.append(seg + frontier_start)
            frontier, frontier_start = new, n_nodes
            n_nodes += new.numel()
            parts.append(new)
    finally:
        node_index = torch.cat(parts)
        local.clear(node_index)
    loops = torch.nonzero(graph.has_loop[node_index]).view(-1)
    edge_src.append(loops)
    edge_dst.append(loops)
    edge_index = _sorted_edges(torch.cat(edge_src), torch.cat(edge_dst), n_nodes)
    return node_index, edge_index, [part.numel() for part in parts]


def induced_subgraph(graph: CompressedGraph, nodes: torch.Tensor, local: LocalIds) -> torch.Tensor:
    """All edges of ``graph`` between the distinct ``nodes`` (self-loops included).

    Returns
    -------
    torch.Tensor
        Local ``(2, E)`` edge index (ids are positions in ``nodes``), sorted
        by source then target.
    """
    local.assign(nodes, 0)
    try:
        seg, _rank, start, _deg = expand_rows(graph, nodes)
        source = local.lookup(graph.src[start[seg] + _rank])
    finally:
        local.clear(nodes)
    inside = source >= 0
    loops = torch.nonzero(graph.has_loop[nodes]).view(-1)
    src = torch.cat([source[inside], loops])
    dst = torch.cat([seg[inside], loops])
    return _sorted_edges(src, dst, nodes.numel())


def _sorted_edges(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    keys = torch.sort(src * n + dst).values
    row = torch.div(keys, n, rounding_mode="floor") if n else keys
    return torch.stack([row, keys - row * n])
