"""The stateful Trainer: optimisation, schedules, early stopping, history and checkpoints."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checkpoint as ckpt
from . import _distributed as ddp
from ._callbacks import call_hook
from ._early_stopping import (
    TOTAL_KEY,
    EarlyStopping,
    StopRule,
    stop_defaults,
)
from ._optim import default_milestones, group_names, kl_warmup_factor, stage_param_groups
from ._progress import LossDisplay, train_loop_formatter
from ._running import RunningMeans
from ._split import make_loaders as _make_loaders
from .loops import full_batch, graph_batch, mini_batch, node_sampler

class NonFiniteError(FloatingPointError):
    """Raised when non-finite losses persist; a training loop turns it into a stop."""


StopConfig = Mapping[str, "tuple[int, float] | None"]


@dataclass
class EpochState:
    """What a one-epoch function needs to know about the epoch it runs."""

    epoch: int  # global epoch index (0-based) across all loops
    loop_epoch: int  # epoch index within the current loop call
    epochs: int  # epochs requested for the current loop call
    display: LossDisplay
    started: float


class Trainer:
    """Train a TranscriptFormer (or any model with a ``loss`` method) with several losses.

    The model computes a dict of named scalar loss terms; the Trainer weighs and sums them,
    steps the optimizer, keeps running means, early-stops each term on its own patience,
    records the history and writes checkpoints from which a run resumes exactly.

    Parameters
    ----------
    model
        The model. Mini-batch loops need ``model.loss(inputs, **kw) -> dict``; graph loops
        need ``model.graph_loss(inputs, edge_index, **kw) -> dict``.
    device
        ``"cpu"``, ``"cuda"``, a :class:`torch.device`, or ``"auto"`` (CUDA when present).
    seed
        Seeds Python, NumPy and torch at construction, and the per-epoch shuffling.
    loss_weights
        Weight of each term in the optimised sum (default 1 for every term).
    early_stopping
        Per-term overrides ``{term: (patience, delta)}``; ``None`` as a value disables a
        term's stopper. Unlisted terms use the defaults (recon 30/1e-2, kl 10/1e-3, cl
        20/1e-4, gate 15/1e-3, others 15/1e-3). ``False`` disables early stopping.
    stop_rule
        ``"all"`` (every stopper exhausted), ``"any"``, or the name of one term (e.g.
        ``"total_loss"``) whose stopper alone decides.
    restore_best
        At the end of a loop, load the weights of the epoch with the best monitored value
        (the stop rule's term, or ``total_loss`` for ``all``/``any``).
    grad_clip
        Maximum gradient norm (``None``: no clipping).
    amp
        ``None``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (GPU, with a GradScaler).
    weight_decay
        Decoupled weight decay (AdamW) when positive; plain Adam otherwise.
    kl_warmup_epochs
        Linear warm-up of the KL weight over this many epochs (0: off).
    check_finite
        Skip any step whose loss or gradient is not finite (one host sync per step).
    max_bad_steps
        Consecutive non-finite steps tolerated before ``on_nonfinite`` acts.
    on_nonfinite
        ``"rollback"``: return to the last good state (weights and optimizer at the end of
        the last finite epoch), halve every learning rate and go on, at most
        ``max_rollbacks`` times; ``"stop"`` (or rollbacks exhausted): end training with a
        message naming the term that went bad (best weights are restored as usual).
    cache_on_device
        Densify the datasets of ``train_batch`` loaders on the device once and gather
        batches there (for datasets that fit in device memory).
    checkpoint_path, checkpoint_every
        Write a checkpoint every ``checkpoint_every`` epochs to ``checkpoint_path``. On
        Ctrl-C or SIGTERM the state after the last completed epoch is written there too.
    callbacks
        Objects with any of ``on_train_start``, ``on_train_epoch_start``,
        ``on_train_batch_end``, ``on_validation_end``, ``on_train_epoch_end``,
        ``on_train_end``; keyword arguments they do not accept are dropped.
    writer
        A TensorBoard ``SummaryWriter`` or a log folder for one.
    distributed
        ``"auto"`` joins the process group that ``torchrun`` describes (gloo on CPU, NCCL
        on GPU) and trains with DistributedDataParallel; ``False`` never does.
    metadata
        Plain values stored in every checkpoint and checked on load (e.g. ``{"genes":
        [...]}``): a checkpoint whose stored value differs is refused.
    verbose
        Show the live display (only on a terminal) and print stop messages.
    trace_func
        Function for messages.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        loss_weights: Mapping[str, float] | None = None,
        early_stopping: StopConfig | bool | None = None,
        stop_rule: str = "all",
        restore_best: bool = True,
        grad_clip: float | None = None,
        amp: str | None = None,
        weight_decay: float = 0.0,
        kl_warmup_epochs: int = 0,
        check_finite: bool = True,
        max_bad_steps: int = 20,
        on_nonfinite: str = "rollback",
        max_rollbacks: int = 3,
        cache_on_device: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        callbacks: Iterable[Any] = (),
        writer: Any = None,
        distributed: bool | str = "auto",
        metadata: Mapping[str, Any] | None = None,
        verbose: bool = True,
        trace_func: Callable[[str], Any] = print,
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}."
            raise TypeError(msg)
        if seed is not None:
            ckpt.seed_everything(seed)
        self.seed = seed
        self.device = self._resolve_device(device)
        self.distributed = False
        if distributed:
            self.distributed = ddp.init_distributed(self.device)
            if self.distributed and self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        self._ddp_model: nn.Module | None = None
        self.metadata = dict(metadata or {})
        self._terms_checked = False
        self.model = model.to(self.device)
        self.loss_weights = dict(loss_weights or {})
        self.stop_config: dict[str, tuple[int, float] | None] = {}
        self.use_early_stopping = early_stopping is not False
        if isinstance(early_stopping, Mapping):
            self.stop_config = dict(early_stopping)
        self.stop_rule = StopRule(stop_rule)
        self.restore_best = restore_best
        self.grad_clip = grad_clip
        self.amp = self._check_amp(amp)
        self.weight_decay = float(weight_decay)
        self.kl_warmup_epochs = int(kl_warmup_epochs)
        self.check_finite = check_finite
        self.max_bad_steps = int(max_bad_steps)
        if on_nonfinite not in ("rollback", "stop"):
            msg = f"on_nonfinite must be 'rollback' or 'stop', got {on_nonfinite!r}."
            raise ValueError(msg)
        self.on_nonfinite = on_nonfinite
        self.max_rollbacks = int(max_rollbacks)
        self.n_rollbacks = 0
        self._good_state: dict[str, Any] | None = None
        self._boundary_state: dict[str, Any] | None = None
        self.cache_on_device = cache_on_device
        self._loader_cache: dict[int, Any] = {}
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.callbacks = list(callbacks)
        self.writer = writer
        self.verbose = verbose
        self.trace_func = trace_func

        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: Any = None
        self._sched_spec: dict[str, Any] = {"kind": "multistep", "milestones": None,
                                            "gamma": 0.5}
        self._optim_spec: dict[str, Any] = {}
        self._frozen: list[nn.Parameter] = []
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.early_stopping: dict[str, EarlyStopping] = {}
        self.stage = 1
        self.epoch = 0
        self.global_step = 0
        self.n_skipped_steps = 0
        self._bad_streak = 0
        self._rows: list[dict[str, Any]] = []
        #: validation means recorded every ``valid_every`` steps by the node-sampler loop
        self.step_history: list[dict[str, float]] = []
        self._loop_name: str | None = None
        self._loop_epoch = 0
        self._resume: tuple[str, int] | None = None
        self._best: dict[str, Any] = {"value": math.inf, "epoch": None, "state": None}
        self._stop_request: str | None = None
        self.stop_reason: str | None = None
        self._last_train: dict[str, float] = {}
        self._last_valid: dict[str, float] | None = None
        self._full_cache: dict[int, dict[str, torch.Tensor]] = {}
        # base for per-epoch shuffling seeds, drawn from the (possibly seeded) torch RNG
        self._epoch_seed_base = int(torch.randint(0, 2**31 - 1, (1,)).item())

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _resolve_device(device: str | torch.device) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            msg = "device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'."
            raise ValueError(msg)
        return dev

    def _check_amp(self, amp: str | None) -> str | None:
        if amp in (None, False, "none"):
            return None
        if amp == "auto":
            if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
                return "bf16"
            return None
        if amp not in ("bf16", "fp16"):
            msg = f"amp must be None, 'auto', 'bf16' or 'fp16', got {amp!r}."
            raise ValueError(msg)
        if amp == "fp16" and self.device.type != "cuda":
            msg = "amp='fp16' needs a CUDA device; use amp='bf16' on the CPU."
            raise ValueError(msg)
        return amp

    @property
    def is_main_process(self) -> bool:
        """Whether this process logs and writes files (rank 0, or not distributed)."""
        return ddp.rank() == 0

    def _wrap_ddp(self) -> None:
        if not self.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # rebuilt per loop: the set of trainable parameters changes between stages
        self._ddp_model = DistributedDataParallel(
            ddp.LossForward(self.model), device_ids=ids, find_unused_parameters=True)

    def _call_model(self, method: str | Callable, *args: Any, **kwargs: Any
                    ) -> dict[str, torch.Tensor]:
        """Call a model method (or a loss function) through the DDP wrapper when training
        is distributed, so gradients are synchronised."""
        if self._ddp_model is not None and self.model.training and torch.is_grad_enabled():
            return self._ddp_model(method, *args, **kwargs)
        fn = method if callable(method) else getattr(self.model, method)
        return fn(*args, **kwargs)

    def _means(self, means: RunningMeans, prefix: str = "") -> dict[str, float]:
        """Epoch means, summed over ranks when training is distributed."""
        return means.means(prefix, reduce=ddp.all_reduce_sum if self.distributed else None)

    def mode_switch_to_train(self) -> None:
        """Put the model in training mode."""
        self.model.train()

    def init_optimizer(
        self,
        lr: float = 1e-3,
        tune_lr: float = 1e-4,
        stage: int = 1,
        tune_batch_embedding: bool = True,
    ) -> torch.optim.Optimizer:
        """Create the optimizer for a training stage.

        Stage 1 trains all parameters at ``lr``. Stage 2 trains the heads (spatial
        smoother, anchors, classifier) at ``lr`` and the pretrained backbone (gene moduler,
        CLS token, expand, transformer, readout, decoder) at ``tune_lr``; the batch
        embedding and readout train at ``tune_lr`` when the model has more than one batch
        and ``tune_batch_embedding`` is true, and are frozen otherwise. Groups are named
        (``head``, ``backbone``, ``batch``; ``all`` in stage 1) and the learning rate of
        each is recorded in :attr:`history`. The schedule is rebuilt for the new optimizer.
        """
        if stage == 2 and getattr(self.model, "smoother", None) is None and getattr(
            self.model, "anchors", None
        ) is None:
            msg = (
                "stage 2 fine-tunes a pretrained backbone under new heads, but the model has "
                "neither a smoother nor anchors; call model.init_smoother_with_builtin() or "
                "model.init_anchors(n_classes) first."
            )
            raise ValueError(msg)
        for p in self._frozen:
            p.requires_grad_(True)
        groups, frozen = stage_param_groups(
            self.model, lr=lr, tune_lr=tune_lr, stage=stage,
            tune_batch_embedding=tune_batch_embedding,
        )
        for p in frozen:
            p.requires_grad_(False)
        self._frozen = frozen
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
        if not groups:
            msg = "the model has no trainable parameters."
            raise ValueError(msg)
        cls = torch.optim.AdamW if self.weight_decay > 0 else torch.optim.Adam
        # the fused kernel updates all parameters in one call: much faster than the
        # per-parameter loop for the many small tensors of a transformer
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                    for g in groups for p in g["params"])
        self.optimizer = cls(groups, lr=lr, weight_decay=self.weight_decay, fused=fused)
        self.stage = stage
        self._optim_spec = {"lr": float(lr), "tune_lr": float(tune_lr), "stage": int(stage),
                            "tune_batch_embedding": bool(tune_batch_embedding)}
        self.lr_scheduler = None  # rebuilt for this optimizer at the next loop start
        return self.optimizer

    def set_lr_scheduler(
        self,
        lr_scheduler: Any = None,
        *,
        kind: str = "multistep",
        milestones: Sequence[int] | None = None,
        gamma: float = 0.5,
        monitor: str = TOTAL_KEY,
        factor: float = 0.5,
        patience: int = 5,
        min_lr: float = 0.0,
    ) -> None:
        """Choose the learning-rate schedule, stepped once per epoch.

        Parameters
        ----------
        lr_scheduler
            A ready scheduler for :attr:`optimizer`, or a function ``optimizer ->
            scheduler``. When given, the keyword options are ignored.
        kind
            ``"multistep"`` (default): multiply every group's lr by ``gamma`` at each epoch
            in ``milestones`` (default: half and three quarters of the loop's epochs);
            ``"plateau"``: ReduceLROnPlateau on the validation value of ``monitor``;
            ``"constant"``: no change.
        """
        if lr_scheduler is not None:
            if self.optimizer is None:
                msg = "call init_optimizer() before passing a scheduler instance."
                raise RuntimeError(msg)
            self.lr_scheduler = (
                lr_scheduler(self.optimizer) if callable(lr_scheduler)
                and not hasattr(lr_scheduler, "step") else lr_scheduler
            )
            self._sched_spec = {"kind": "custom"}
            return
        if kind not in ("multistep", "plateau", "constant"):
            msg = f"kind must be 'multistep', 'plateau' or 'constant', got {kind!r}."
            raise ValueError(msg)
        if not 0 < gamma <= 1 or not 0 < factor < 1:
            msg = f"gamma must lie in (0, 1] and factor in (0, 1); got {gamma}, {factor}."
            raise ValueError(msg)
        self._sched_spec = {
            "kind": kind, "milestones": None if milestones is None else sorted(
                int(m) for m in milestones), "gamma": float(gamma),
            "monitor": monitor.removeprefix("val_"), "factor": float(factor),
            "patience": int(patience), "min_lr": float(min_lr),
        }
        self.lr_scheduler = None

    def _build_scheduler(self, epochs: int) -> Any:
        spec = self._sched_spec
        kind = spec["kind"]
        if kind == "multistep":
            milestones = spec["milestones"]
            if milestones is None:
                milestones = default_milestones(epochs)
            return torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, milestones=list(milestones), gamma=spec["gamma"])
        if kind == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=spec["factor"], patience=spec["patience"],
                min_lr=spec["min_lr"])
        if kind == "constant":
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        msg = "a custom scheduler cannot be rebuilt; pass it again with set_lr_scheduler()."
        raise RuntimeError(msg)

    def _step_scheduler(self, monitored: Mapping[str, float]) -> None:
        if self.lr_scheduler is None:
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            key = self._sched_spec.get("monitor", TOTAL_KEY)
            if key not in monitored:
                msg = (f"the plateau schedule monitors {key!r}, which is not a loss term; "
                       f"available: {sorted(monitored)}.")
                raise KeyError(msg)
            self.lr_scheduler.step(monitored[key])
        else:
            self.lr_scheduler.step()

    # ----------------------------------------------------------- loss & step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def kl_weight(self) -> float | None:
        """The KL weight for the current epoch under warm-up, or None (model default)."""
        if self.kl_warmup_epochs <= 0:
            return None
        base = float(getattr(self.model, "kl_weight", 1.0))
        return base * kl_warmup_factor(self._loop_epoch, self.kl_warmup_epochs)

    def _loss_kwargs(self) -> dict[str, Any]:
        w = self.kl_weight()
        return {} if w is None else {"kl_weight": w}

    def to_device(self, inputs: Any) -> Any:
        """Move a tensor, or the tensors inside a dict/list/tuple, to the trainer's device."""
        if torch.is_tensor(inputs):
            return inputs.to(self.device, non_blocking=True)
        if isinstance(inputs, Mapping):
            return {k: self.to_device(v) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            return type(inputs)(self.to_device(v) for v in inputs)
        return inputs

    def _require(self, method: str, loop: str) -> None:
        if not callable(getattr(self.model, method, None)):
            msg = (f"{loop} needs a model with a `{method}` method; "
                   f"{type(self.model).__name__} has none.")
            raise TypeError(msg)

    def handle_input_tuple(self, input_tuple: Any) -> dict[str, torch.Tensor]:
        """Compute the loss terms of one mini-batch with ``model.loss``.

        ``input_tuple`` is the batch dict a dataset loader yields (``x``, ``library``, and
        optionally ``batch``/``label``), or a ``(x,)``/``(x, batch)`` tuple of tensors.
        Override this, or pass ``call_func`` to a loop, for custom losses.
        """
        inputs = self._as_inputs(input_tuple)
        with self._autocast():
            return self._call_model("loss", inputs, **self._loss_kwargs())

    @staticmethod
    def _as_inputs(input_tuple: Any) -> dict[str, torch.Tensor]:
        if isinstance(input_tuple, Mapping):
            if "x" not in input_tuple:
                msg = (f"a batch must hold the counts under 'x'; got keys "
                       f"{sorted(input_tuple)}.")
                raise KeyError(msg)
            return dict(input_tuple)
        if isinstance(input_tuple, (list, tuple)) and input_tuple and torch.is_tensor(
                input_tuple[0]):
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

    def handle_ginput_tuple(
        self, graph: Any, dataset: Any, mask: torch.Tensor | None = None, *,
        end_to_end: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss terms of one (sub-)graph with ``model.graph_loss``.

        Node features are gathered from ``dataset`` by the graph's ``node_index`` (so the
        counts stay sparse until here); the loss covers nodes where ``mask`` is true.
        """
        inputs = self.to_device(dataset[graph.node_index])
        edge_index = graph.edge_index.to(self.device, non_blocking=True)
        if mask is not None:
            mask = mask.to(self.device, non_blocking=True)
        with self._autocast():
            return self._call_model(
                "graph_loss", inputs, edge_index, loss_mask=mask, end_to_end=end_to_end,
                **self._loss_kwargs())

    def _total(self, loss_dict: Mapping[str, Any]) -> torch.Tensor:
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

    def update_model_params(
        self, loss_dict: Mapping[str, Any], epoch: int | None = None
    ) -> torch.Tensor:
        """Backpropagate the weighted sum of the loss terms and step the optimizer.

        Gradients are clipped to :attr:`grad_clip` when set. With ``check_finite`` a step
        whose loss or gradient norm is not finite is skipped, so bad values never reach the
        weights; after ``max_bad_steps`` such steps in a row a ``FloatingPointError`` names
        the terms that went bad. Returns the detached total.
        """
        if self.optimizer is None:
            msg = "call init_optimizer() before training."
            raise RuntimeError(msg)
        total = self._total(loss_dict)
        if not self._terms_checked:
            self._check_terms(loss_dict)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        elif self.check_finite and params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = None
        ok = True
        if self.check_finite:
            finite = torch.isfinite(total)
            if norm is not None:
                finite = finite & torch.isfinite(norm)
            ok = bool(finite)  # the one host sync per step: bad values must not land
            if self.distributed:
                ok = ddp.all_agree(ok, self.device)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif ok:
            self.optimizer.step()
        if ok:
            self._bad_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.n_skipped_steps += 1
            self._bad_streak += 1
            if self._bad_streak >= self.max_bad_steps:
                self._handle_bad_streak(loss_dict)
        self.global_step += 1
        return total.detach()

    def _check_terms(self, loss_dict: Mapping[str, Any]) -> None:
        """Before the first weight update: every configured term must exist."""
        terms = {k for k, v in loss_dict.items() if torch.is_tensor(v)} | {TOTAL_KEY}
        if self.use_early_stopping:
            self.stop_rule.validate(terms)
        for what, names in (("early_stopping", self.stop_config), ("loss_weights",
                                                                    self.loss_weights)):
            unknown = sorted(set(names) - terms)
            if unknown:
                msg = (f"{what} names {unknown}, which the model does not return; its terms "
                       f"are {sorted(terms)}.")
                raise KeyError(msg)
        self._terms_checked = True

    def _snapshot_good_state(self) -> None:
        if self.on_nonfinite != "rollback" or self.optimizer is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return
        self._good_state = {
            "model": {k: v.detach().to("cpu", copy=True)
                      for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _handle_bad_streak(self, loss_dict: Mapping[str, Any]) -> None:
        bad = [k for k, v in loss_dict.items()
               if torch.is_tensor(v) and not bool(torch.isfinite(v).all())]
        what = f"loss terms {bad}" if bad else "the gradients"
        streak, self._bad_streak = self._bad_streak, 0
        if (self.on_nonfinite == "rollback" and self._good_state is not None
                and self.n_rollbacks < self.max_rollbacks):
            self.model.load_state_dict(self._good_state["model"])
            self.optimizer.load_state_dict(self._good_state["optimizer"])
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.5
                if "initial_lr" in group:
                    group["initial_lr"] *= 0.5
            if hasattr(self.lr_scheduler, "base_lrs"):  # schedules recompute from these
                self.lr_scheduler.base_lrs = [lr * 0.5 for lr in self.lr_scheduler.base_lrs]
            self.n_rollbacks += 1
            self._say(f"{streak} consecutive non-finite steps in {what} at epoch {self.epoch}: "
                      "rolled back to the last good state and halved the learning rates "
                      f"(rollback {self.n_rollbacks}/{self.max_rollbacks}).")
            return
        msg = (f"training stopped at epoch {self.epoch}: {streak} consecutive steps had "
               f"non-finite values in {what}. Lower the learning rate, set grad_clip, or "
               "check the input counts.")
        raise NonFiniteError(msg)

    def _say(self, message: str) -> None:
        if self.verbose and self.is_main_process:
            self.trace_func(message)

    # ---------------------------------------------------------- running means
    @staticmethod
    def cum_loss(
        loss_dict: Mapping[str, Any],
        total_loss_dict: RunningMeans | None = None,
        n_obs: int = 1,
    ) -> RunningMeans:
        """Add one step's loss terms (detached, weighted by ``n_obs``) to running means."""
        total_loss_dict = RunningMeans() if total_loss_dict is None else total_loss_dict
        total_loss_dict.add(loss_dict, n_obs)
        return total_loss_dict

    def format_loss_dict(
        self,
        loss_dict: Mapping[str, float],
        valid_loss_dict: Mapping[str, float] | None = None,
    ) -> str:
        """One line per term: ``term  train  val  best``."""
        best = self._best_values()
        lines = []
        for term, value in loss_dict.items():
            val = None if valid_loss_dict is None else valid_loss_dict.get(f"val_{term}")
            parts = [f"{term}: train {float(value):.4g}"]
            if val is not None:
                parts.append(f"val {val:.4g}")
            if term in best:
                parts.append(f"best {best[term]:.4g}")
            lines.append(", ".join(parts))
        return "\n".join(lines)

    # ---------------------------------------------------------- early stopping
    def setup_early_stopping(self, loss_dict: Mapping[str, Any]) -> dict[str, EarlyStopping]:
        """Create one :class:`EarlyStopping` per loss term (and ``total_loss``).

        Terms configured as ``None`` get no stopper. The stop rule's named monitor must be
        one of the terms.
        """
        terms = [k.removeprefix("val_") for k in loss_dict]
        if TOTAL_KEY not in terms:
            terms.append(TOTAL_KEY)
        self.stop_rule.validate(terms)
        unknown = set(self.stop_config) - set(terms)
        if unknown:
            msg = (f"early_stopping configures {sorted(unknown)}, which are not loss terms; "
                   f"available: {sorted(terms)}.")
            raise KeyError(msg)
        stoppers = {}
        for term in terms:
            if term in self.stop_config:
                cfg = self.stop_config[term]
                if cfg is None:
                    continue
                patience, delta = cfg
            else:
                d = stop_defaults(term)
                patience, delta = d.patience, d.delta
            stoppers[term] = EarlyStopping(patience, delta=delta, name=term,
                                           trace_func=self.trace_func)
        self.early_stopping = stoppers
        return stoppers

    def check_early_stop(self, total_loss_dict: Mapping[str, float]) -> bool:
        """Step every stopper with this epoch's values; return whether the rule says stop.

        Validation values (``val_<term>``) are used when present, training values otherwise.
        """
        monitored = self._monitored(total_loss_dict)
        for term, stopper in self.early_stopping.items():
            if term in monitored:
                stopper.step(monitored[term], self.epoch)
        stop, culprits = self.stop_rule.decide(self.early_stopping)
        if stop:
            desc = "; ".join(
                f"{t} made no progress larger than {self.early_stopping[t].delta:g} for "
                f"{self.early_stopping[t].counter} epochs (best {self.early_stopping[t].best_score:.5g}"
                f" at epoch {self.early_stopping[t].best_epoch})" for t in culprits)
            self.stop_reason = f"early stop after epoch {self.epoch} (rule {self.stop_rule.rule!r}): {desc}"
        return stop

    @staticmethod
    def _monitored(values: Mapping[str, float]) -> dict[str, float]:
        has_val = any(k.startswith("val_") for k in values)
        if has_val:
            return {k.removeprefix("val_"): v for k, v in values.items() if k.startswith("val_")}
        return dict(values)

    def _best_values(self) -> dict[str, float]:
        return {k: s.best_score for k, s in self.early_stopping.items()
                if math.isfinite(s.best_score)}

    def request_stop(self, reason: str) -> None:
        """Ask the running loop to stop after the current epoch (used by callbacks)."""
        self._stop_request = reason

    # ----------------------------------------------------------------- loops
    def _display_enabled(self) -> bool:
        if not self.verbose or not self.is_main_process:
            return False
        from rich.console import Console

        return Console(stderr=True).is_terminal

    def _begin_loop(self, name: str, epochs: int) -> int:
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            msg = f"epochs must be a positive integer, got {epochs!r}."
            raise ValueError(msg)
        if self.optimizer is None:
            msg = "call init_optimizer() before training."
            raise RuntimeError(msg)
        start = 0
        if self._resume is not None and self._resume[0] == name:
            start = self._resume[1]
        else:
            self.early_stopping = {}
            self._best = {"value": math.inf, "epoch": None, "state": None}
            self.lr_scheduler = None if self._sched_spec["kind"] != "custom" else self.lr_scheduler
        self._resume = None
        if self.lr_scheduler is None:
            self.lr_scheduler = self._build_scheduler(epochs)
        self._loop_name = name
        self._terms_checked = False
        self._loop_epoch = start
        self._stop_request = None
        self.stop_reason = None
        self.model.train()
        self._wrap_ddp()
        self._snapshot_good_state()
        self._snapshot_boundary_state()
        call_hook(self.callbacks, "on_train_start", trainer=self, loop=name, epochs=epochs)
        return start

    def _begin_epoch(self, loop_epoch: int, epochs: int, display: LossDisplay) -> EpochState:
        self._loop_epoch = loop_epoch
        self.model.train()
        call_hook(self.callbacks, "on_train_epoch_start", trainer=self, epoch=self.epoch)
        return EpochState(self.epoch, loop_epoch, epochs, display, time.perf_counter())

    def _end_epoch(
        self, state: EpochState, train: Mapping[str, float],
        valid: Mapping[str, float] | None,
    ) -> bool:
        self._last_train, self._last_valid = dict(train), None if valid is None else dict(valid)
        if not train:
            msg = f"{self._loop_name} ran no training step in epoch {self.epoch}: empty loader?"
            raise ValueError(msg)
        values = {**train, **(valid or {})}
        if valid:
            call_hook(self.callbacks, "on_validation_end", trainer=self, logs=dict(valid))
        row: dict[str, Any] = {"epoch": self.epoch, "loop": self._loop_name,
                               "stage": self.stage}
        for name, group in zip(group_names(self.optimizer), self.optimizer.param_groups):
            row[f"lr_{name}"] = group["lr"]
        kl = self.kl_weight()
        if kl is not None:
            row["kl_weight"] = kl
        row.update(values)

        stop = False
        if self.use_early_stopping:
            if not self.early_stopping:
                self.setup_early_stopping(values)
            stop = self.check_early_stop(values)
        monitored = self._monitored(values)
        best_key = self.stop_rule.monitor or TOTAL_KEY
        current = monitored.get(best_key, math.nan)
        row["best"] = bool(math.isfinite(current) and current < self._best["value"])
        if row["best"]:
            self._best = {"value": current, "epoch": self.epoch,
                          "state": {k: v.detach().to("cpu", copy=True)
                                    for k, v in self.model.state_dict().items()}}
        row["seconds"] = time.perf_counter() - state.started
        call_hook(self.callbacks, "on_train_epoch_end", trainer=self, epoch=self.epoch,
                  logs=row)
        requested = self._stop_request is not None
        if self.distributed:
            requested = ddp.any_rank(requested, self.device)
            self._stop_request = self._stop_request or ("another process asked to stop"
                                                        if requested else None)
        if requested and not stop:
            stop = True
            self.stop_reason = f"stopped after epoch {self.epoch}: {self._stop_request}"
        self._rows.append(row)
        if self.is_main_process:
            self._write_tensorboard(row)
        self._step_scheduler(monitored)
        self.epoch += 1
        self._loop_epoch = state.loop_epoch + 1
        if (self.checkpoint_path is not None and self.checkpoint_every
                and self.epoch % int(self.checkpoint_every) == 0):
            self.save_checkpoint(self.checkpoint_path)
        if all(math.isfinite(v) for v in train.values()):
            self._snapshot_good_state()
        self._snapshot_boundary_state()
        return stop

    def _end_loop(self, stopped: bool) -> None:
        restored = None
        if self.restore_best and self._best["state"] is not None and (
                self._best["epoch"] != self.epoch - 1):
            self.model.load_state_dict(self._best["state"])
            restored = self._best["epoch"]
        call_hook(self.callbacks, "on_train_end", trainer=self, stopped=stopped)
        if self.stop_reason:
            self._say(self.stop_reason)
        if restored is not None:
            key = self.stop_rule.monitor or TOTAL_KEY
            self._say(f"restored the weights of epoch {restored} "
                      f"(best {key} = {self._best['value']:.5g}).")
        self._full_cache.clear()
        self._loader_cache.clear()
        self._ddp_model = None

    def _snapshot_boundary_state(self) -> None:
        """Keep the state at the last epoch boundary in memory (when checkpointing), so an
        interruption can save a state from which a resumed run continues exactly."""
        if self.checkpoint_path is None or self.optimizer is None or not self.is_main_process:
            self._boundary_state = None
            return
        state = self.state_dict()
        best = state.pop("best")  # replaced when it changes, never updated in place
        self._boundary_state = {**ckpt.detached_copy(state), "best": dict(best)}

    def _on_interrupt(self, reason: str) -> None:
        """Save the state of the last completed epoch (rank 0) when training is interrupted.

        The weights in the middle of an epoch are not saved: a run resumed from them would
        not match an uninterrupted one. The resumed run repeats the interrupted epoch.
        """
        self.stop_reason = f"interrupted during epoch {self.epoch} ({reason})"
        state, self._boundary_state = self._boundary_state, None
        if self.checkpoint_path is not None and state is not None:
            ckpt.write_checkpoint(state, self.checkpoint_path)
            done = state["counters"]["epoch"]
            self.stop_reason += (f"; the state after epoch {done} was saved to "
                                 f"{os.fspath(self.checkpoint_path)}")

    def _write_tensorboard(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        if isinstance(self.writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                msg = "TensorBoard logging needs the tensorboard package: pip install tensorboard"
                raise ImportError(msg) from err
            self.writer = SummaryWriter(os.fspath(self.writer))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])

    def _epoch_seed(self, epoch: int) -> int:
        return (self._epoch_seed_base + 1_000_003 * (epoch + 1)) % (2**31 - 1)

    def _set_loader_epoch(self, loader: Any, epoch: int) -> None:
        """Make a loader's shuffling a function of the epoch, so resumed runs match."""
        candidates = [loader, getattr(loader, "batch_sampler", None),
                      getattr(loader, "sampler", None)]
        candidates += [getattr(c, "sampler", None) for c in candidates[1:] if c is not None]
        for obj in candidates:
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                return
        for obj in candidates:
            gen = getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(self._epoch_seed(epoch))
                return

    def _cached(self, loader: Any) -> Any:
        """The device-cached version of ``loader`` when caching is on."""
        if not self.cache_on_device or loader is None:
            return loader
        from ._device_cache import DeviceCachedLoader

        key = id(loader)
        if key not in self._loader_cache:
            self._loader_cache[key] = DeviceCachedLoader(loader, self.device)
        return self._loader_cache[key]

    def _after_step(self, state: EpochState, loss_dict: Mapping[str, Any]) -> None:
        state.display.advance_steps()
        if self.callbacks:
            call_hook(self.callbacks, "on_train_batch_end", trainer=self,
                      step=self.global_step, loss_dict=loss_dict)

    @train_loop_formatter
    def train(self, state: EpochState, X: Any, train_ind: Any = None, valid_ind: Any = None,
              call_func: Callable | None = None, **kwargs: Any):
        """Full-batch training: one step per epoch on the whole matrix.

        Called as ``trainer.train(epochs, X, train_ind=None, valid_ind=None,
        call_func=None)``. ``X`` is a dataset, a dict of tensors, or a counts tensor; it is
        gathered once and kept on the device. Validation uses ``valid_ind`` when given.
        """
        return full_batch.run_epoch(self, state, X, train_ind, valid_ind, call_func, **kwargs)

    @train_loop_formatter
    def train_batch(self, state: EpochState, loaders: Any, call_func: Callable | None = None):
        """Mini-batch training over ``loaders = (train_loader, valid_loader)``.

        Called as ``trainer.train_batch(epochs, loaders, call_func=None)``; validation runs
        after each epoch when a validation loader is given (it may be None).
        """
        return mini_batch.run_epoch(self, state, loaders, call_func)

    @train_loop_formatter
    def train_graph_batch(self, state: EpochState, gloader: Any, dataset: Any,
                          train_ind: Any = None, valid_ind: Any = None):
        """Training over batches of whole section graphs.

        Called as ``trainer.train_graph_batch(epochs, gloader, dataset, train_ind=None,
        valid_ind=None)``. ``gloader`` yields torch-geometric batches whose ``node_index``
        points into ``dataset``; the loss covers ``train_ind`` nodes and validation the
        held-out ``valid_ind`` nodes of the same graphs.
        """
        return graph_batch.run_epoch(self, state, gloader, dataset, train_ind, valid_ind)

    @train_loop_formatter
    def train_node_sampler(self, state: EpochState, gloader: Any, dataset: Any,
                           train_ind: Any = None, valid_ind: Any = None, *,
                           valid_loader: Any = None, valid_every: int | None = None,
                           max_steps: int | None = None, end_to_end: bool = True):
        """Training with one step per sampled sub-graph of a large graph.

        Called as ``trainer.train_node_sampler(epochs, sampler, dataset, train_ind=None,
        valid_ind=None, valid_loader=None, valid_every=None, max_steps=None)``. An epoch is
        one pass of ``sampler`` (or ``max_steps`` steps); the loss covers the seed nodes
        among ``train_ind``. Validation runs over ``valid_loader`` (a sampler whose seeds
        are validation nodes) at each epoch end and every ``valid_every`` steps.
        """
        return node_sampler.run_epoch(self, state, gloader, dataset, train_ind, valid_ind,
                                      valid_loader, valid_every, max_steps, end_to_end)

    # ------------------------------------------------------------ validation
    def _compute(self, inputs: Any, call_func: Callable | None) -> dict[str, torch.Tensor]:
        if call_func is None:
            return self.handle_input_tuple(self.to_device(inputs))
        with self._autocast():
            return self._call_model(call_func, self.to_device(inputs))

    @staticmethod
    def _n_obs(inputs: Any) -> int:
        if isinstance(inputs, Mapping):
            return int(len(inputs["x"]))
        if isinstance(inputs, (list, tuple)):
            return int(len(inputs[0]))
        return int(len(inputs))

    def _eval_mode(self) -> contextlib.AbstractContextManager:
        trainer = self

        @contextlib.contextmanager
        def ctx():
            was_training = trainer.model.training
            trainer.model.eval()
            try:
                with torch.no_grad():
                    yield
            finally:
                trainer.model.train(was_training)

        return ctx()

    def validate_loader(self, loader: Iterable, call_func: Callable | None = None
                        ) -> dict[str, float]:
        """Mean loss terms over ``loader`` in eval mode without gradients (``val_<term>``)."""
        means = RunningMeans()
        with self._eval_mode():
            for inputs in loader:
                loss_dict = self._compute(inputs, call_func)
                n = self._n_obs(inputs)
                means.add(loss_dict, n)
                means.add({TOTAL_KEY: self._total(loss_dict)}, n)
        return self._means(means, "val_")

    def validate_X(self, X: Any, ind: Any = None, call_func: Callable | None = None
                   ) -> dict[str, float]:
        """Mean loss terms on the rows ``ind`` of ``X`` (all rows when None), in eval mode."""
        inputs = full_batch.gather(self, X, ind)
        with self._eval_mode():
            loss_dict = self._compute(inputs, call_func)
            means = RunningMeans()
            means.add(loss_dict)
            means.add({TOTAL_KEY: self._total(loss_dict)})
        return self._means(means, "val_")

    def validate_gloader(self, gloader: Iterable, dataset: Any, valid_ind: Any = None,
                         *, end_to_end: bool = False) -> dict[str, float]:
        """Mean loss terms on the ``valid_ind`` nodes of every graph in ``gloader``."""
        return graph_batch.validate(self, gloader, dataset, valid_ind, end_to_end=end_to_end)

    # ------------------------------------------------------------- inference
    def predict(self, data: Any, *, batch_size: int = 1024, method: str = "embed"
                ) -> np.ndarray:
        """Apply ``model.<method>`` to every item of a dataset in batches, in eval mode.

        Returns a NumPy array in dataset order (the embedding by default: the posterior
        mean, never a random sample).
        """
        from step.utils.dataset import index_loader

        self._require(method, "predict")
        fn = getattr(self.model, method)
        is_dataset = hasattr(data, "subset")
        loader = index_loader(data, batch_size, shuffle=False) if is_dataset else data
        # Batches of a dataset go straight into one array: many small per-batch outputs
        # kept until a final concatenation fragment the heap and raise the peak memory.
        out: np.ndarray | None = None
        outs: list[np.ndarray] = []
        start = 0
        with self._eval_mode(), self._autocast():
            for inputs in loader:
                batch = fn(self.to_device(self._as_inputs(inputs))).float().cpu().numpy()
                if not is_dataset:
                    outs.append(batch)
                    continue
                if out is None:
                    out = np.empty((len(data), *batch.shape[1:]), dtype=np.float32)
                out[start:start + len(batch)] = batch
                start += len(batch)
        if out is not None:
            return out
        return np.concatenate(outs) if outs else np.empty((0,), dtype=np.float32)

    # ------------------------------------------------------------ history
    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch: train and ``val_`` terms, ``lr_<group>``, stage, loop,
        seconds, and whether the epoch was the best so far."""
        return pd.DataFrame(self._rows)

    # ---------------------------------------------------------- checkpoints
    def _scheduler_state(self) -> dict[str, Any] | None:
        if self.lr_scheduler is None:
            return None
        state = self.lr_scheduler.state_dict()
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in state.items()
                if not callable(v)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain containers."""
        import step

        rows = self._rows
        columns = sorted({k for r in rows for k in r})
        return {
            "version": step.__version__,
            "metadata": dict(self.metadata),
            "model": self.model.state_dict(),
            "model_config": dict(getattr(self.model, "config", {}) or {}),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "optimizer_spec": dict(self._optim_spec),
            "scheduler": self._scheduler_state(),
            "scheduler_spec": dict(self._sched_spec),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "stoppers": {k: s.state_dict() for k, s in self.early_stopping.items()},
            "counters": {"epoch": self.epoch, "global_step": self.global_step,
                         "stage": self.stage, "loop_name": self._loop_name or "",
                         "loop_epoch": self._loop_epoch,
                         "epoch_seed_base": self._epoch_seed_base,
                         "n_skipped_steps": self.n_skipped_steps},
            "best": {"value": self._best["value"],
                     "epoch": -1 if self._best["epoch"] is None else self._best["epoch"],
                     "state": self._best["state"]},
            "history": {"columns": columns,
                        "rows": [[r.get(c) for c in columns] for r in rows]},
            "rng": ckpt.rng_state(),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file + rename).

        Under data-parallel training only rank 0 writes; the others wait for it.
        """
        if self.is_main_process:
            ckpt.write_checkpoint(self.state_dict(), path)
        ddp.barrier()

    def load_checkpoint(self, path: str | os.PathLike, *, restore_rng: bool = True) -> None:
        """Restore a checkpoint so that the next call of the same loop continues exactly.

        The file is read without executing code; a checkpoint of a model with another
        configuration is refused with a ``ValueError`` naming the differences.
        """
        ddp.barrier()  # rank 0 may still be writing
        state = ckpt.read_checkpoint(path, map_location=self.device)
        self._check_compatible(state, path)
        own = dict(getattr(self.model, "config", {}) or {})
        saved = state.get("model_config") or {}
        if own and saved and own != saved:
            diff = sorted(k for k in set(own) | set(saved) if own.get(k) != saved.get(k))
            msg = f"checkpoint {os.fspath(path)!r} is for a model with other settings: {diff}."
            raise ValueError(msg)
        self.load_state_dict(state, restore_rng=restore_rng)

    def _check_compatible(self, state: Mapping[str, Any], path: Any) -> None:
        import step

        saved = str(state.get("version", "?"))
        if saved.split(".")[:2] != step.__version__.split(".")[:2]:
            msg = (f"checkpoint {os.fspath(path)!r} was written by step {saved}; this is step "
                   f"{step.__version__}, whose checkpoints differ. Load it with that version.")
            raise ValueError(msg)
        stored = state.get("metadata") or {}
        for key in sorted(set(stored) & set(self.metadata)):
            if stored[key] != self.metadata[key]:
                detail = ""
                if isinstance(stored[key], list) and isinstance(self.metadata[key], list):
                    missing = sorted(set(stored[key]) - set(self.metadata[key]))[:5]
                    extra = sorted(set(self.metadata[key]) - set(stored[key]))[:5]
                    detail = f" (in the checkpoint only: {missing}; here only: {extra})"
                msg = (f"checkpoint {os.fspath(path)!r} does not fit: its {key!r} differs from "
                       f"this trainer's{detail}.")
                raise ValueError(msg)

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            msg = f"the checkpoint's weights do not fit this model: {err}"
            raise ValueError(msg) from err
        spec = state["optimizer_spec"]
        if spec:
            self.init_optimizer(**spec)
            self.optimizer.load_state_dict(state["optimizer"])
        self._sched_spec = dict(state["scheduler_spec"])
        if state["scheduler"] is not None and self._sched_spec.get("kind") != "custom":
            self.lr_scheduler = self._build_scheduler(1)
            sched = dict(state["scheduler"])
            if "milestones" in sched:
                sched["milestones"] = Counter(sched["milestones"])
            self.lr_scheduler.load_state_dict(sched)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.early_stopping = {}
        for name, sd in state["stoppers"].items():
            stopper = EarlyStopping(trace_func=self.trace_func)
            stopper.load_state_dict(sd)
            self.early_stopping[name] = stopper
        c = state["counters"]
        self.epoch, self.global_step, self.stage = c["epoch"], c["global_step"], c["stage"]
        self._loop_epoch = c["loop_epoch"]
        self._epoch_seed_base = c["epoch_seed_base"]
        self.n_skipped_steps = c["n_skipped_steps"]
        self._loop_name = c["loop_name"] or None
        if self._loop_name:
            self._resume = (self._loop_name, self._loop_epoch)
        best = state["best"]
        self._best = {"value": best["value"],
                      "epoch": None if best["epoch"] < 0 else best["epoch"],
                      "state": best["state"]}
        hist = state["history"]
        self._rows = [{c: v for c, v in zip(hist["columns"], row) if v is not None}
                      for row in hist["rows"]]
        if restore_rng:
            ckpt.set_rng_state(state["rng"])

    # -------------------------------------------------------------- loaders
    @staticmethod
    def make_loaders(dataset: Any, batch_size: int, split_rate: float = 0.2,
                     shuffle: bool = True, obs_key: str | None = None, **kwargs: Any):
        """Split ``dataset`` (stratified by ``obs_key`` when given) into loaders.

        Returns ``(train_loader, valid_loader)``; see
        :func:`step.functionality.comps.trainer.make_loaders`.
        """
        return _make_loaders(dataset, batch_size, split_rate, shuffle, obs_key, **kwargs)

    def __repr__(self) -> str:
        return (f"Trainer(model={type(self.model).__name__}, device={self.device}, "
                f"stage={self.stage}, epoch={self.epoch}, stop_rule={self.stop_rule.rule!r})")

