"""The Trainer's four public loops: each says which batch source an epoch iterates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._progress import train_loop_formatter
from .sources import (
    BatchSource,
    FullMatrixSource,
    GraphBatchSource,
    MiniBatchSource,
    SubgraphSource,
)


class LoopMethods:
    """Mixed into :class:`Trainer`; :func:`train_loop_formatter` runs the epochs."""

    @train_loop_formatter
    def train(self, epochs: int, X: Any, train_ind: Any = None, valid_ind: Any = None,
              call_func: Callable | None = None, **kwargs: Any) -> BatchSource:
        """Full-batch training: one step per epoch on the whole matrix.

        ``X`` is a dataset, a dict of tensors, or a counts tensor; it is gathered once and
        kept on the device. Validation uses ``valid_ind`` when given; extra keyword
        arguments are added to the inputs. Returns whether training stopped early.
        """
        return FullMatrixSource(X, train_ind, valid_ind, call_func, kwargs)

    @train_loop_formatter
    def train_batch(self, epochs: int, loaders: Any, call_func: Callable | None = None, *,
                    steps_per_epoch: int | None = None) -> BatchSource:
        """Mini-batch training over ``loaders = (train_loader, valid_loader)``.

        Validation runs after each epoch when a validation loader is given (it may be
        None). ``steps_per_epoch`` ends each epoch after that many steps (for very
        large data; checkpoints and resume then work at that granularity). Returns
        whether training stopped early.
        """
        return MiniBatchSource(loaders, call_func, cache_on_device=self.cache_on_device,
                               steps_per_epoch=steps_per_epoch)

    @train_loop_formatter
    def train_graph_batch(self, epochs: int, gloader: Any, dataset: Any, train_ind: Any = None,
                          valid_ind: Any = None) -> BatchSource:
        """Training over batches of whole section graphs.

        ``gloader`` yields torch-geometric batches whose ``node_index`` points into
        ``dataset``; the loss covers ``train_ind`` nodes and validation the held-out
        ``valid_ind`` nodes of the same graphs. Returns whether training stopped early.
        """
        return GraphBatchSource(gloader, dataset, train_ind, valid_ind)

    @train_loop_formatter
    def train_node_sampler(self, epochs: int, gloader: Any, dataset: Any, train_ind: Any = None,
                           valid_ind: Any = None, *, valid_loader: Any = None,
                           valid_every: int | None = None, max_steps: int | None = None,
                           end_to_end: bool = True) -> BatchSource:
        """Training with one step per sampled sub-graph of a large graph.

        An epoch is one pass of ``gloader`` (a sampler) or ``max_steps`` sub-graphs; the
        loss covers the seed nodes among ``train_ind``. Validation runs over
        ``valid_loader`` (a sampler whose seeds are validation nodes) at each epoch end
        and every ``valid_every`` steps. Returns whether training stopped early.
        """
        return SubgraphSource(gloader, dataset, train_ind, valid_ind, valid_loader=valid_loader,
                              valid_every=valid_every, max_steps=max_steps, end_to_end=end_to_end)
