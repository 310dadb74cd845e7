"""The training plan: how a batch becomes named loss terms (device, precision, weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._compile import LossCompiler, check_compile
from ._early_stopping import TOTAL_KEY
from ._optim import kl_warmup_factor


def as_inputs(input_tuple: Any) -> dict[str, torch.Tensor]:
    """Normalise a batch to the dict a model's ``loss`` takes (``x``, ``library``, ...).

    Accepts the dict a dataset loader yields, a ``(x,)``/``(x, batch)`` tuple of tensors,
    or a counts tensor.
    """
    if isinstance(input_tuple, Mapping):
        if "x" not in input_tuple:
            msg = f"a batch must hold the counts under 'x'; got keys {sorted(input_tuple)}."
            raise KeyError(msg)
        return dict(input_tuple)
    if isinstance(input_tuple, (list, tuple)) and input_tuple and torch.is_tensor(input_tuple[0]):
        x = input_tuple[0]
        inputs = {"x": x, "library": x.sum(1)}
        if len(input_tuple) > 1:
            inputs["batch"] = input_tuple[1]
        return inputs
    if torch.is_tensor(input_tuple):
        return {"x": input_tuple, "library": input_tuple.sum(1)}
    msg = ("a loader must yield dicts of tensors (with 'x') or tuples of tensors; got "
           f"{type(input_tuple).__name__}.")
    raise TypeError(msg)


def n_obs(inputs: Any) -> int:
    """Number of observations (rows) in a batch."""
    if isinstance(inputs, Mapping):
        return int(len(inputs["x"]))
    if isinstance(inputs, (list, tuple)):
        return int(len(inputs[0]))
    return int(len(inputs))


class TrainingPlan:
    """Compute the loss terms of a batch: placement, autocast, KL warm-up, weighted total.

    Parameters
    ----------
    model
        The model; ``loss(inputs, **kw)`` and ``graph_loss(inputs, edge_index, **kw)``
        return dicts of named scalar tensors.
    device
        Where inputs are moved.
    amp
        ``None``, ``"bf16"`` or ``"fp16"``: the autocast precision of the forward pass.
    loss_weights
        Weight of each term in the optimised total (1 for unlisted terms).
    kl_warmup_epochs
        Linear warm-up of the model's KL weight over this many loop epochs (0: off).
        Validation always uses the full KL weight, so validation values of different
        epochs stay comparable (and early stopping compares like with like).
    compile
        ``True`` or a ``torch.compile`` mode: compile ``model.loss``/``graph_loss`` once
        (at first use); on failure, warn once and continue eagerly.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, amp: str | None = None,
                 loss_weights: Mapping[str, float] | None = None,
                 kl_warmup_epochs: int = 0, compile: bool | str = False) -> None:
        self.model = model
        self.device = device
        self.amp = amp
        self.loss_weights = dict(loss_weights or {})
        self.kl_warmup_epochs = int(kl_warmup_epochs)
        #: epoch of the running loop, for the KL warm-up
        self.loop_epoch = 0
        self.evaluating = False
        self.compiler = LossCompiler(check_compile(compile))

    # -- context ------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (a no-op in full precision)."""
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Eval mode, no gradients and the full KL weight; the previous mode is restored."""
        was_training, was_evaluating = self.model.training, self.evaluating
        self.model.eval()
        self.evaluating = True
        try:
            with torch.no_grad():
                yield
        finally:
            self.evaluating = was_evaluating
            self.model.train(was_training)

    def kl_weight(self) -> float | None:
        """The warm-up KL weight of the current epoch, or None (the model's own weight)."""
        if self.kl_warmup_epochs <= 0 or self.evaluating:
            return None
        base = float(getattr(self.model, "kl_weight", 1.0))
        return base * kl_warmup_factor(self.loop_epoch, self.kl_warmup_epochs)

    def loss_kwargs(self) -> dict[str, Any]:
        weight = self.kl_weight()
        return {} if weight is None else {"kl_weight": weight}

    # -- computing ----------------------------------------------------------------
    def to_device(self, inputs: Any) -> Any:
        """Move a tensor, or the tensors inside a dict/list/tuple, to the device."""
        if torch.is_tensor(inputs):
            return inputs.to(self.device, non_blocking=True)
        if isinstance(inputs, Mapping):
            return {k: self.to_device(v) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            return type(inputs)(self.to_device(v) for v in inputs)
        return inputs

    def require(self, method: str, loop: str) -> None:
        """Refuse a loop whose model lacks the method it needs."""
        if not callable(getattr(self.model, method, None)):
            msg = (f"{loop} needs a model with a `{method}` method; "
                   f"{type(self.model).__name__} has none.")
            raise TypeError(msg)

    def loss(self, inputs: Any, call_func: Callable | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one batch: ``model.loss`` (or ``call_func``) on the device."""
        inputs = self.to_device(inputs)
        with self.autocast():
            if call_func is not None:
                return call_func(inputs)
            return self.compiler("loss", self.model.loss, as_inputs(inputs),
                                 **self.loss_kwargs())

    def graph_loss(self, graph: Any, dataset: Any, mask: torch.Tensor | None = None, *,
                   end_to_end: bool = False) -> dict[str, torch.Tensor]:
        """Loss terms of one (sub-)graph with ``model.graph_loss``.

        Node features are gathered from ``dataset`` by the graph's ``node_index`` (the
        counts stay sparse until here); the loss covers the nodes where ``mask`` is true.
        """
        inputs = self.to_device(dataset[graph.node_index])
        edge_index = graph.edge_index.to(self.device, non_blocking=True)
        if mask is not None:
            mask = mask.to(self.device, non_blocking=True)
        with self.autocast():
            return self.compiler("graph_loss", self.model.graph_loss, inputs, edge_index,
                                 loss_mask=mask, end_to_end=end_to_end,
                                 **self.loss_kwargs())

    def total(self, loss_dict: Mapping[str, Any]) -> torch.Tensor:
        """The weighted sum of the tensor terms, as a float32 scalar."""
        terms = {k: v for k, v in loss_dict.items() if torch.is_tensor(v)}
        if not terms:
            msg = (f"the loss dict holds no tensor term (keys: {sorted(loss_dict)}); a loss "
                   "function must return named scalar tensors.")
            raise ValueError(msg)
        total = None
        for key, value in terms.items():
            if value.numel() != 1:
                msg = f"loss term {key!r} must be a scalar, got shape {tuple(value.shape)}."
                raise ValueError(msg)
            weighted = value.float() * self.loss_weights.get(key, 1.0)
            total = weighted if total is None else total + weighted
        return total.reshape(())

    def terms(self, loss_dict: Mapping[str, Any]) -> set[str]:
        """Names of the tensor terms of a loss dict, plus ``total_loss``."""
        return {k for k, v in loss_dict.items() if torch.is_tensor(v)} | {TOTAL_KEY}
