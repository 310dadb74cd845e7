"""Sources over spatial graphs: batches of whole section graphs, or sampled sub-graphs."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .. import _distributed as ddp
from .base import Batch, BatchSource, Shard, set_loader_epoch, share_sampler_seed, steps_per_process


def _mask(n: int, ind: Any) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.tensor(np.asarray(ind), dtype=torch.long)] = True
    return mask


def node_masks(n: int, train_ind: Any, valid_ind: Any, *, need_train: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean train/valid masks over the dataset's ``n`` nodes.

    ``train_ind=None`` means every node that is not in ``valid_ind``. The two sets must
    not overlap.
    """
    valid = None if valid_ind is None else _mask(n, valid_ind)
    if train_ind is None:
        train = torch.ones(n, dtype=torch.bool) if valid is None else ~valid
    else:
        train = _mask(n, train_ind)
        if valid is not None and bool((train & valid).any()):
            msg = "train_ind and valid_ind share nodes; validation nodes must be held out."
            raise ValueError(msg)
    if need_train and not bool(train.any()):
        msg = "no training node: train_ind is empty."
        raise ValueError(msg)
    return train, valid


def check_graph(graph: Any) -> None:
    if not hasattr(graph, "node_index") or not hasattr(graph, "edge_index"):
        msg = ("graph loaders must yield torch-geometric graphs with `edge_index` and "
               f"`node_index` (positions in the dataset); got {type(graph).__name__}.")
        raise TypeError(msg)


class GraphBatchSource(BatchSource):
    """Batches of whole section graphs; the loss covers the training nodes of each.

    ``gloader`` yields torch-geometric batches whose ``node_index`` points into
    ``dataset``; validation runs on the held-out ``valid_ind`` nodes of the same graphs.
    Under data-parallel training every process takes every ``world``-th graph batch.
    """

    name = "train_graph_batch"
    seeds_only = False

    def __init__(self, gloader: Iterable, dataset: Any, train_ind: Any = None,
                 valid_ind: Any = None, *, end_to_end: bool = False,
                 evaluate_only: bool = False) -> None:
        super().__init__()
        self.gloader, self.dataset = gloader, dataset
        self.end_to_end = end_to_end
        self.train_mask, self.valid_mask = node_masks(len(dataset), train_ind, valid_ind,
                                                      need_train=not evaluate_only)

    def bind(self, plan: Any, shard: Shard) -> None:
        super().bind(plan, shard)
        plan.require("graph_loss", self.name)
        if shard.world > 1:
            ddp.check_same("training nodes", self.train_mask.numpy())
            if self.valid_mask is not None:
                ddp.check_same("validation nodes", self.valid_mask.numpy())

    def set_epoch(self, epoch: int, seed: int) -> None:
        set_loader_epoch(self.gloader, epoch, seed)

    def _from(self, graphs: Iterable, mask: torch.Tensor) -> Iterator[Batch]:
        for graph in ddp.round_robin(graphs, rank=self.shard.rank, world=self.shard.world):
            if graph is None:
                yield Batch.empty()
                continue
            check_graph(graph)
            own = mask[graph.node_index]
            if self.seeds_only:
                own = own & graph.seed_mask
            n = int(own.sum())
            if n == 0:
                if self.shard.world > 1:  # keep every process's step count equal
                    yield Batch.empty()
                continue
            yield Batch(self._compute(graph, own), n, graph.node_index[own])

    def _compute(self, graph: Any, own: torch.Tensor):
        return lambda: self.plan.graph_loss(graph, self.dataset, own, end_to_end=self.end_to_end)

    def batches(self) -> Iterator[Batch]:
        return self._from(self.gloader, self.train_mask)

    def n_steps(self) -> int | None:
        n = len(self.gloader) if hasattr(self.gloader, "__len__") else None
        return steps_per_process(n, self.shard)

    def validation_batches(self) -> Iterable[Batch] | None:
        if self.valid_mask is None:
            return None
        return self._from(self.gloader, self.valid_mask)


class SubgraphSource(GraphBatchSource):
    """One step per sampled sub-graph of a large graph; the loss covers its seed nodes.

    An epoch is one pass of ``sampler`` (or ``max_steps`` sub-graphs, drawing from fresh
    passes as needed). Validation runs over ``valid_loader`` (a sampler whose seeds are
    validation nodes) at each epoch end and every ``valid_every`` optimizer steps; the
    validation sampler is set to the number of validations so far, so a resumed run
    validates on the same neighbourhoods.
    """

    name = "train_node_sampler"
    seeds_only = True

    def __init__(self, sampler: Any, dataset: Any, train_ind: Any = None, valid_ind: Any = None,
                 *, valid_loader: Any = None, valid_every: int | None = None,
                 max_steps: int | None = None, end_to_end: bool = True) -> None:
        super().__init__(sampler, dataset, train_ind, valid_ind, end_to_end=end_to_end)
        if valid_loader is not None and self.valid_mask is None:
            msg = "valid_loader was given without valid_ind: say which nodes are held out."
            raise ValueError(msg)
        if valid_every is not None and (valid_loader is None or int(valid_every) < 1):
            msg = "valid_every needs a valid_loader and a positive step count."
            raise ValueError(msg)
        self.steps = len(sampler) if max_steps is None else int(max_steps)
        if self.steps < 1:
            msg = f"max_steps must be positive, got {max_steps!r}."
            raise ValueError(msg)
        self.valid_loader = valid_loader
        self.valid_every = None if valid_every is None else int(valid_every)
        self.n_validations = 0

    def bind(self, plan: Any, shard: Shard) -> None:
        super().bind(plan, shard)
        share_sampler_seed(self.gloader)
        share_sampler_seed(self.valid_loader)

    def batches(self) -> Iterator[Batch]:
        passes = itertools.chain.from_iterable(iter(self.gloader) for _ in itertools.count())
        return self._from(itertools.islice(passes, self.steps), self.train_mask)

    def n_steps(self) -> int | None:
        return steps_per_process(self.steps, self.shard)

    def validation_batches(self) -> Iterable[Batch] | None:
        if self.valid_loader is None:
            return None
        set_loader_epoch(self.valid_loader, self.n_validations, self.n_validations)
        self.n_validations += 1
        return self._from(self.valid_loader, self.valid_mask)

    def state_dict(self) -> dict[str, Any]:
        return {"n_validations": self.n_validations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_validations = int(state.get("n_validations", 0))
