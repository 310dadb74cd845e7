"""Sub-graph samplers for training on graphs too large for one step.

Both samplers are iterables over :class:`~step.graph.GraphData` items (a
:class:`torch_geometric.data.Data` that keeps ``node_index`` global when
batched) that share one contract:

``node_index``
    ``int64`` global ids of the sub-graph's nodes, seed nodes first.
``edge_index``
    ``int64`` local edges ``(2, E)`` (positions in ``node_index``), directed
    from source to target as in message passing, including a self-loop for
    each node that has one in the full graph.
``n_seed``
    Number of seed nodes (the first ``n_seed`` entries of ``node_index``).
``seed_mask``
    ``bool`` tensor over the sub-graph's nodes, true for seeds.
``num_nodes``
    Number of nodes in the sub-graph.
``num_sampled_nodes``
    List with the number of nodes first reached at each hop, seeds first.

An epoch visits every seed node exactly once in batches; ``len()`` is the
number of steps of an epoch. Everything is pure torch; sampling is reproducible
from ``seed`` and the epoch number (see :meth:`NeighborSampler.set_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from step.graph import _backends
from step.graph._csr import CompressedGraph, LocalIds, induced_subgraph, sample_hops
from step.graph._data import GraphData
from step.graph._seed_order import block_shuffle
from step.graph._validate import as_edge_index, as_num_neighbors, check_int, section_codes

SamplerBackend = Literal["torch", "pyg_lib", "auto"]
_BACKENDS = ("torch", "pyg_lib", "auto")


def _as_input_nodes(input_nodes: Any, num_nodes: int) -> torch.Tensor:
    """Seed candidates as ascending distinct ``int64`` ids (all nodes when ``None``)."""
    if input_nodes is None:
        return torch.arange(num_nodes, dtype=torch.long)
    if isinstance(input_nodes, torch.Tensor):
        nodes = input_nodes.detach().cpu()
    else:
        nodes = torch.tensor(np.asarray(input_nodes))  # a copy: the array may be read-only
    if nodes.dtype == torch.bool:
        if nodes.numel() != num_nodes:
            msg = f"a boolean `input_nodes` mask needs {num_nodes} entries, got {nodes.numel()}."
            raise ValueError(msg)
        nodes = torch.nonzero(nodes).view(-1)
    elif nodes.dtype.is_floating_point:
        msg = f"`input_nodes` must hold integer node ids or be a boolean mask, got {nodes.dtype}."
        raise TypeError(msg)
    nodes = torch.unique(nodes.long().view(-1))
    if nodes.numel() == 0:
        msg = "`input_nodes` selects no node; at least one seed node is needed."
        raise ValueError(msg)
    if int(nodes[0]) < 0 or int(nodes[-1]) >= num_nodes:
        msg = (
            f"`input_nodes` must lie in [0, {num_nodes}), "
            f"got ids from {int(nodes[0])} to {int(nodes[-1])}."
        )
        raise ValueError(msg)
    return nodes


def _seed_from_torch() -> int:
    """A seed drawn from torch's global generator, so ``torch.manual_seed`` governs it."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _EpochSampler:
    """Seeded epochs over batches of seed nodes, shared by both samplers."""

    def __init__(
        self,
        edge_index: Any,
        num_nodes: int,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int | None,
        input_nodes: Any,
        sections: Any = None,
        graph_batch_size: int | None = None,
        seed_block_size: int | None = None,
    ) -> None:
        num_nodes = check_int(num_nodes, "num_nodes", minimum=1)
        self.num_nodes = num_nodes
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = _seed_from_torch() if seed is None else check_int(seed, "seed", minimum=0)
        self.seed_block_size = (
            None if seed_block_size is None
            else check_int(seed_block_size, "seed_block_size", minimum=1)
        )
        self.graph = CompressedGraph.from_edge_index(
            as_edge_index(edge_index, num_nodes), num_nodes
        )
        self._local = LocalIds(num_nodes)
        self.input_nodes = _as_input_nodes(input_nodes, num_nodes)
        self._epoch = 0
        self._active_epoch: int | None = None
        self._one_off: torch.Generator | None = None

        if sections is None and graph_batch_size is not None:
            msg = "`graph_batch_size` needs `sections` (one section label per node)."
            raise ValueError(msg)
        self.sections: np.ndarray | None = None
        self.graph_batch_size: int | None = None
        if sections is not None:
            codes, labels = section_codes(sections, num_nodes)
            self.sections = codes
            self.section_labels = labels
            self.graph_batch_size = (
                1
                if graph_batch_size is None
                else check_int(graph_batch_size, "graph_batch_size", minimum=1)
            )
            seed_codes = torch.from_numpy(codes)[self.input_nodes]
            order = torch.sort(seed_codes, stable=True).indices
            self._seeds_by_section = self.input_nodes[order]
            counts = torch.bincount(seed_codes, minlength=len(labels))
            self._section_ptr = torch.cat(
                [torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]
            )
            self._seeded_sections = torch.nonzero(counts).view(-1)

    # -- epochs ---------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Number of the epoch that the next ``iter()`` call runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (e.g. when resuming)."""
        self._epoch = check_int(epoch, "epoch", minimum=0)

    def state_dict(self) -> dict[str, int]:
        """Seed and next epoch; with :meth:`load_state_dict` this resumes the sequence."""
        return {"seed": self.seed, "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.seed = check_int(state["seed"], "seed", minimum=0)
        self.set_epoch(state["epoch"])

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, epoch, stream]).generate_state(
            2, dtype=np.uint32
        )
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def _split(self, seeds: torch.Tensor) -> list[torch.Tensor]:
        batches = list(torch.split(seeds, self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        return batches

    def _section_groups(self, epoch: int) -> list[torch.Tensor]:
        """Sections of each group of ``graph_batch_size`` sections in an epoch."""
        present = self._seeded_sections
        if self.shuffle:
            present = present[torch.randperm(present.numel(), generator=self._generator(epoch, 0))]
        return list(torch.split(present, self.graph_batch_size))  # type: ignore[arg-type]

    def _shuffled(self, seeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.seed_block_size is None:
            return seeds[torch.randperm(seeds.numel(), generator=gen)]
        return block_shuffle(seeds, self.seed_block_size, gen)

    def _steps_in(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _plan(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Seed batches of one epoch, with the sections drawn for each."""
        gen = self._generator(epoch, 1)
        if self.sections is None:
            seeds = self.input_nodes
            if self.shuffle:
                seeds = self._shuffled(seeds, gen)
            for batch in self._split(seeds):
                yield batch, None
            return
        ptr = self._section_ptr
        for group in self._section_groups(epoch):
            seeds = torch.cat([self._seeds_by_section[ptr[s] : ptr[s + 1]] for s in group.tolist()])
            if self.shuffle:
                seeds = self._shuffled(seeds, gen)
            for batch in self._split(seeds):
                yield batch, group

    def __len__(self) -> int:
        epoch = self._epoch if self._active_epoch is None else self._active_epoch
        if self.sections is None:
            return self._steps_in(self.input_nodes.numel())
        ptr = self._section_ptr
        sizes = [
            int(sum(ptr[s + 1] - ptr[s] for s in g.tolist())) for g in self._section_groups(epoch)
        ]
        return sum(self._steps_in(n) for n in sizes)

    def __iter__(self) -> Iterator[GraphData]:
        epoch = self._epoch
        self._epoch += 1
        self._active_epoch = epoch
        return self._run(epoch)

    def _run(self, epoch: int) -> Iterator[GraphData]:
        gen = self._generator(epoch, 2)
        try:
            for seeds, group in self._plan(epoch):
                data = self._sample(seeds, gen)
                if group is not None:
                    data.sections = group.clone()
                yield data
        finally:
            if self._active_epoch == epoch:
                self._active_epoch = None

    def sample(self, seeds: Any, *, generator: torch.Generator | None = None) -> GraphData:
        """Sample the sub-graph of one batch of seed nodes.

        Parameters
        ----------
        seeds
            Distinct global node ids.
        generator
            Source of randomness; when ``None``, a generator seeded from
            ``seed`` once and shared by all such calls.

        Returns
        -------
        GraphData
            An item following the module's contract.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.long).view(-1)
        if seeds.numel() == 0:
            msg = "`seeds` is empty; at least one seed node is needed."
            raise ValueError(msg)
        if int(seeds.min()) < 0 or int(seeds.max()) >= self.num_nodes:
            msg = (
                f"`seeds` must lie in [0, {self.num_nodes}), "
                f"got ids from {int(seeds.min())} to {int(seeds.max())}."
            )
            raise ValueError(msg)
        if torch.unique(seeds).numel() != seeds.numel():
            msg = "`seeds` contains repeated node ids; seeds must be distinct."
            raise ValueError(msg)
        if generator is None:
            if self._one_off is None:
                self._one_off = self._generator(0, 3)
            generator = self._one_off
        return self._sample(seeds, generator)

    def _sample(
        self, seeds: torch.Tensor, generator: torch.Generator
    ) -> GraphData:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _item(
        node_index: torch.Tensor, edge_index: torch.Tensor, n_seed: int, hop_sizes: list[int]
    ) -> GraphData:
        seed_mask = torch.zeros(node_index.numel(), dtype=torch.bool)
        seed_mask[:n_seed] = True
        return GraphData(
            node_index=node_index,
            edge_index=edge_index,
            n_seed=n_seed,
            seed_mask=seed_mask,
            num_nodes=int(node_index.numel()),
            num_sampled_nodes=hop_sizes,
        )


class NeighborSampler(_EpochSampler):
    """Mini-batches of seed nodes with their sampled k-hop neighbourhoods.

    Each step takes ``batch_size`` seed nodes and samples, hop by hop, up to
    ``num_neighbors[h]`` distinct incoming neighbours (self-loops excluded)
    for every node first reached at the previous hop; the sub-graph holds the
    sampled edges plus the self-loops of its nodes.

    Parameters
    ----------
    edge_index
        ``(2, E)`` integer edges (source, target) in global ids, e.g. from
        :func:`step.graph.build_spatial_graph`.
    num_nodes
        Number of nodes of the graph.
    num_neighbors
        Fan-out per hop; ``-1`` takes all neighbours at that hop.
    batch_size
        Seed nodes per step.
    shuffle
        Shuffle seeds (and sections) every epoch.
    drop_last
        Drop a last, smaller batch (per section group in the sectioned mode).
    seed
        Seed of all randomness; ``None`` draws one from torch's global generator.
    sections
        Optional section label per node. With it, each step draws its seeds
        from ``graph_batch_size`` sections only: an epoch shuffles the
        sections, groups them, and runs through each group's seeds.
    graph_batch_size
        Sections per step (default 1 when ``sections`` is given).
    input_nodes
        Nodes that may be seeds (ids or boolean mask), e.g. training nodes;
        all nodes by default. Neighbours may be any node.
    seed_block_size
        Shuffle seeds in runs of this many consecutive seed ids instead of one
        by one (``None``, the default). See the notes.
    backend
        ``"torch"`` (default, reproducible from ``seed``), ``"pyg_lib"``
        (compiled sampler; needs pyg-lib; its randomness follows torch's
        global generator, not ``seed``), or ``"auto"`` (pyg-lib when
        importable).

    Notes
    -----
    The cost of one step depends on ``batch_size``, the fan-outs and node
    degrees, not on the number of nodes: the adjacency is compressed once,
    and each step reads only the rows it samples. An epoch draws one
    permutation of the seed nodes.
    With ``sections``, ``len()`` can change from epoch to epoch since it
    depends on how the sections are grouped; it reports the epoch being
    iterated (or the next one).

    With ``seed_block_size``, an epoch cuts the seeds (in id order, per
    section group) into runs of ``seed_block_size`` consecutive seeds, starting
    at a random offset, and visits the runs in random order; a batch then holds
    about ``batch_size / seed_block_size`` random runs. On data whose rows
    follow :func:`step.graph.spatial_order`, a run is a compact patch of tissue,
    so a sub-graph covers a few patches and its rows form a few contiguous
    ranges of the store (few reads from disk). Seeds of one batch are then
    spatially correlated; smaller runs are closer to independent seeds.
    """

    def __init__(
        self,
        edge_index: Any,
        num_nodes: int,
        *,
        num_neighbors: int | Sequence[int] = (10, 10),
        batch_size: int = 512,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        sections: Any = None,
        graph_batch_size: int | None = None,
        input_nodes: Any = None,
        seed_block_size: int | None = None,
        backend: SamplerBackend = "torch",
    ) -> None:
        if backend not in _BACKENDS:
            msg = f"`backend` must be one of {_BACKENDS}, got {backend!r}."
            raise ValueError(msg)
        if backend == "pyg_lib" and not _backends.WITH_PYG_LIB:
            msg = "`backend='pyg_lib'` needs the pyg-lib package; use backend='torch'."
            raise ValueError(msg)
        self.num_neighbors = as_num_neighbors(num_neighbors)
        self.backend = "pyg_lib" if backend == "auto" and _backends.WITH_PYG_LIB else backend
        if self.backend == "auto":
            self.backend = "torch"
        super().__init__(
            edge_index,
            num_nodes,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            input_nodes=input_nodes,
            sections=sections,
            graph_batch_size=graph_batch_size,
            seed_block_size=seed_block_size,
        )

    def _sample(self, seeds: torch.Tensor, generator: torch.Generator) -> GraphData:
        if self.backend == "pyg_lib":  # pragma: no cover - needs pyg-lib
            node_index, edge_index, hop_sizes = self._sample_pyg_lib(seeds)
        else:
            node_index, edge_index, hop_sizes = sample_hops(
                self.graph, seeds, self.num_neighbors, self._local, generator
            )
        return self._item(node_index, edge_index, seeds.numel(), hop_sizes)

    def _sample_pyg_lib(
        self, seeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:  # pragma: no cover
        from pyg_lib.sampler import neighbor_sample

        out = neighbor_sample(
            self.graph.ptr,
            self.graph.src,
            seeds,
            list(self.num_neighbors),
            csc=True,
            replace=False,
            directed=True,
            return_edge_id=False,
        )
        row, col, node_index = out[0], out[1], out[2]
        loops = torch.nonzero(self.graph.has_loop[node_index]).view(-1)
        n = node_index.numel()
        keys = torch.sort(torch.cat([row, loops]) * n + torch.cat([col, loops])).values
        src = torch.div(keys, n, rounding_mode="floor")
        hop_sizes = list(out[4]) if len(out) > 4 else [seeds.numel(), n - seeds.numel()]
        return node_index, torch.stack([src, keys - src * n]), hop_sizes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_nodes={self.num_nodes}, "
            f"num_neighbors={list(self.num_neighbors)}, batch_size={self.batch_size}, "
            f"steps={len(self)}, backend={self.backend!r})"
        )


class RandomNodeSampler(_EpochSampler):
    """Induced sub-graphs of random node sets.

    An epoch shuffles the nodes and cuts them into sets of
    ``num_nodes_per_step``; each item is the sub-graph induced by one set
    (every edge of the graph between its nodes, self-loops included), and all
    of its nodes are seeds.

    Parameters
    ----------
    edge_index
        ``(2, E)`` integer edges (source, target) in global ids.
    num_nodes
        Number of nodes of the graph.
    num_nodes_per_step
        Nodes per sub-graph.
    shuffle, drop_last, seed, input_nodes, seed_block_size
        As in :class:`NeighborSampler`.

    Notes
    -----
    On a large graph a random node set is sparse in space, so most of its
    nodes keep only their self-loop; :class:`NeighborSampler` preserves
    neighbourhoods. The cost per step depends on ``num_nodes_per_step`` and
    the degrees, not on the size of the graph.
    """

    def __init__(
        self,
        edge_index: Any,
        num_nodes: int,
        *,
        num_nodes_per_step: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        input_nodes: Any = None,
        seed_block_size: int | None = None,
    ) -> None:
        super().__init__(
            edge_index,
            num_nodes,
            batch_size=check_int(num_nodes_per_step, "num_nodes_per_step", minimum=1),
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            input_nodes=input_nodes,
            seed_block_size=seed_block_size,
        )
        self.num_nodes_per_step = self.batch_size

    def _sample(self, seeds: torch.Tensor, generator: torch.Generator) -> GraphData:
        edge_index = induced_subgraph(self.graph, seeds, self._local)
        return self._item(seeds, edge_index, seeds.numel(), [seeds.numel()])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_nodes={self.num_nodes}, "
            f"num_nodes_per_step={self.num_nodes_per_step}, steps={len(self)})"
        )
