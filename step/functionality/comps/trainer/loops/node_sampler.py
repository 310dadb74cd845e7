"""Node-sampler loop: one step per sampled sub-graph; loss on the seed nodes only."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from .._early_stopping import TOTAL_KEY
from .._running import RunningMeans
from .graph_batch import _check_graph, _validate_masked, node_masks

if TYPE_CHECKING:
    from .._trainer import EpochState, Trainer


def run_epoch(
    trainer: Trainer, state: EpochState, sampler: Any, dataset: Any, train_ind: Any,
    valid_ind: Any, valid_loader: Any, valid_every: int | None, max_steps: int | None,
    end_to_end: bool,
) -> tuple[dict[str, float], dict[str, float] | None]:
    trainer._require("graph_loss", "train_node_sampler")
    train_mask, valid_mask = node_masks(len(dataset), train_ind, valid_ind)
    if valid_loader is not None and valid_mask is None:
        msg = "valid_loader was given without valid_ind: say which nodes are held out."
        raise ValueError(msg)
    if valid_every is not None and (valid_loader is None or int(valid_every) < 1):
        msg = "valid_every needs a valid_loader and a positive step count."
        raise ValueError(msg)
    trainer._set_loader_epoch(sampler, state.epoch)
    steps = len(sampler) if max_steps is None else int(max_steps)
    if steps < 1:
        msg = f"max_steps must be positive, got {max_steps!r}."
        raise ValueError(msg)
    state.display.start_steps(steps)
    means = RunningMeans()
    # with max_steps beyond one pass, keep drawing from fresh passes of the sampler
    stream = itertools.chain.from_iterable(iter(sampler) for _ in itertools.count())
    for sub in itertools.islice(stream, steps):
        _check_graph(sub)
        mask = train_mask[sub.node_index] & sub.seed_mask
        n = int(mask.sum())
        if n == 0:
            continue
        loss_dict = trainer.handle_ginput_tuple(sub, dataset, mask, end_to_end=end_to_end)
        total = trainer.update_model_params(loss_dict, state.epoch)
        means.add(loss_dict, n)
        means.add({TOTAL_KEY: total}, n)
        trainer._after_step(state, loss_dict)
        if valid_every is not None and trainer.global_step % int(valid_every) == 0:
            step_valid = _validate_masked(trainer, valid_loader, dataset, valid_mask,
                                          end_to_end=end_to_end, seeds_only=True)
            trainer.step_history.append({"step": trainer.global_step, **step_valid})
    valid = None
    if valid_loader is not None:
        valid = _validate_masked(trainer, valid_loader, dataset, valid_mask,
                                 end_to_end=end_to_end, seeds_only=True)
    return trainer._means(means), valid
