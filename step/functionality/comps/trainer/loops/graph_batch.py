"""Graph-batch loop: one step per batch of whole section graphs, node-masked losses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._early_stopping import TOTAL_KEY
from .._running import RunningMeans

if TYPE_CHECKING:
    from .._trainer import EpochState, Trainer


def node_masks(n: int, train_ind: Any, valid_ind: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean train/valid masks over the dataset's ``n`` nodes.

    ``train_ind=None`` means every node that is not in ``valid_ind``. The two sets must
    not overlap.
    """
    valid = None
    if valid_ind is not None:
        valid = torch.zeros(n, dtype=torch.bool)
        valid[torch.tensor(np.asarray(valid_ind), dtype=torch.long)] = True
    if train_ind is None:
        train = torch.ones(n, dtype=torch.bool) if valid is None else ~valid
    else:
        train = torch.zeros(n, dtype=torch.bool)
        train[torch.tensor(np.asarray(train_ind), dtype=torch.long)] = True
        if valid is not None and bool((train & valid).any()):
            msg = "train_ind and valid_ind share nodes; validation nodes must be held out."
            raise ValueError(msg)
    if not bool(train.any()):
        msg = "no training node: train_ind is empty."
        raise ValueError(msg)
    return train, valid


def _check_graph(graph: Any) -> None:
    if not hasattr(graph, "node_index") or not hasattr(graph, "edge_index"):
        msg = ("graph loaders must yield torch-geometric graphs with `edge_index` and "
               f"`node_index` (positions in the dataset); got {type(graph).__name__}.")
        raise TypeError(msg)


def run_epoch(
    trainer: Trainer, state: EpochState, gloader: Iterable, dataset: Any,
    train_ind: Any, valid_ind: Any,
) -> tuple[dict[str, float], dict[str, float] | None]:
    trainer._require("graph_loss", "train_graph_batch")
    train_mask, valid_mask = node_masks(len(dataset), train_ind, valid_ind)
    trainer._set_loader_epoch(gloader, state.epoch)
    state.display.start_steps(len(gloader) if hasattr(gloader, "__len__") else None)
    means = RunningMeans()
    for graph in gloader:
        _check_graph(graph)
        mask = train_mask[graph.node_index]
        n = int(mask.sum())
        if n == 0:
            continue
        loss_dict = trainer.handle_ginput_tuple(graph, dataset, mask)
        total = trainer.update_model_params(loss_dict, state.epoch)
        means.add(loss_dict, n)
        means.add({TOTAL_KEY: total}, n)
        trainer._after_step(state, loss_dict)
    valid = None
    if valid_mask is not None:
        valid = _validate_masked(trainer, gloader, dataset, valid_mask, end_to_end=False)
    return trainer._means(means), valid


def _validate_masked(
    trainer: Trainer, gloader: Iterable, dataset: Any, valid_mask: torch.Tensor, *,
    end_to_end: bool, seeds_only: bool = False, max_graphs: int | None = None,
) -> dict[str, float]:
    means = RunningMeans()
    with trainer._eval_mode():
        for i, graph in enumerate(gloader):
            if max_graphs is not None and i >= max_graphs:
                break
            _check_graph(graph)
            mask = valid_mask[graph.node_index]
            if seeds_only:
                mask = mask & graph.seed_mask
            n = int(mask.sum())
            if n == 0:
                continue
            loss_dict = trainer.handle_ginput_tuple(graph, dataset, mask, end_to_end=end_to_end)
            means.add(loss_dict, n)
            means.add({TOTAL_KEY: trainer._total(loss_dict)}, n)
    return trainer._means(means, "val_")


def validate(trainer: Trainer, gloader: Iterable, dataset: Any, valid_ind: Any = None, *,
             end_to_end: bool = False) -> dict[str, float]:
    """Validation means on the ``valid_ind`` nodes (all nodes when None) of each graph."""
    n = len(dataset)
    if valid_ind is None:
        mask = torch.ones(n, dtype=torch.bool)
    else:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.tensor(np.asarray(valid_ind), dtype=torch.long)] = True
    return _validate_masked(trainer, gloader, dataset, mask, end_to_end=end_to_end)
