"""The Trainer: the public face of the training plan, step, loops and their state."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checkpoint as ckpt
from ._checkpointing import CheckpointMethods
from . import _distributed as ddp
from ._device import resolve_device, resolve_precision
from ._early_stopping import EarlyStopping, StopRule
from ._evaluation import EvaluationLoop
from ._fit_loop import FitLoop
from ._guard import NonFiniteGuard
from ._history import History, TensorBoardLogger
from ._optim import build_optimizer
from ._plan import TrainingPlan, as_inputs
from ._predict import predict
from ._loops import LoopMethods
from ._memory import reuse_freed_memory as reuse_memory
from ._running import RunningMeans
from ._schedule import Schedule
from ._split import make_loaders as _make_loaders
from ._step import TrainingStep
from ._stoppers import StopConfig, StopperSet
from .sources import BatchSource, FullMatrixSource, GraphBatchSource, MiniBatchSource


class Trainer(LoopMethods, CheckpointMethods):
    """Train a TranscriptFormer (or any model with a ``loss`` method) with several losses.

    The model computes a dict of named scalar loss terms; the Trainer weighs and sums them,
    steps the optimizer, keeps running means, early-stops each term on its own patience,
    records the history and writes checkpoints from which every loop resumes exactly.

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
        At the end of a loop, load the weights of the best epoch: the last epoch at which
        the monitored term (the stop rule's term, or ``total_loss`` for ``all``/``any``)
        improved by more than its stopper's ``delta``.
    grad_clip
        Maximum gradient norm (``None``: no clipping).
    precision
        ``"fp32"`` (the default), ``"bf16"`` (autocast, CPU or GPU), ``"fp16"`` (GPU, with
        a GradScaler) or ``"auto"``: bf16 where the device computes it natively (CPUs
        with AMX-BF16 or AVX512-BF16, CUDA compute capability 8.0 or newer), fp32
        elsewhere. The choice made is ``trainer.precision``.
    amp
        The older spelling of ``precision`` (None, ``"auto"``, ``"bf16"``, ``"fp16"``).
    compile
        ``True`` or ``"reduce-overhead"`` (a ``torch.compile`` mode): compile the loss
        computation; if compiling fails, warn once and train uncompiled.
    weight_decay
        Decoupled weight decay (AdamW) when positive; plain Adam otherwise.
    kl_warmup_epochs
        Linear warm-up of the KL weight over this many epochs of a loop (0: off).
        Validation always uses the full weight, so its values compare across epochs.
    check_finite, max_bad_steps, on_nonfinite, max_rollbacks
        The non-finite guard: skip steps whose loss or gradient is not finite; after
        ``max_bad_steps`` in a row, roll back to the last good state with halved
        learning rates (``"rollback"``, at most ``max_rollbacks`` times) or stop
        (``"stop"``). When it cannot recover the loop raises :class:`NonFiniteError`.
    cache_on_device
        Densify the datasets of ``train_batch`` loaders on the device once.
    reuse_freed_memory
        On the CPU with glibc (Linux), let the allocator keep the buffers a step frees
        for the next steps instead of returning them to the system and faulting them in
        again (:func:`~step.functionality.comps.trainer.reuse_freed_memory`; it changes
        two allocator settings for the whole process). ``False`` leaves the allocator
        as it is.
    checkpoint_path, checkpoint_every
        Write a checkpoint every ``checkpoint_every`` epochs and when a loop ends. On
        Ctrl-C or SIGTERM the state after the last completed epoch is written there.
    callbacks
        Objects with any of ``on_train_start``, ``on_train_epoch_start``,
        ``on_train_batch_end``, ``on_validation_end``, ``on_train_epoch_end``,
        ``on_train_end``; keyword arguments they do not accept are dropped. Callbacks
        with ``state_dict``/``load_state_dict`` are saved in the checkpoints.
    writer
        A TensorBoard ``SummaryWriter`` or a log folder for one.
    distributed
        ``"auto"`` joins the process group that ``torchrun`` describes (gloo on CPU, NCCL
        on GPU); every loop then trains each process on its own shard. ``False`` never.
    metadata
        Plain values stored in every checkpoint and checked on load (e.g. ``{"genes":
        [...]}``): a checkpoint whose stored value differs is refused.
    verbose
        Show the live display (only on a terminal) and print stop messages.
    trace_func
        Function for messages.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu",
                 seed: int | None = None, loss_weights: Mapping[str, float] | None = None,
                 early_stopping: StopConfig | bool | None = None, stop_rule: str = "all",
                 restore_best: bool = True, grad_clip: float | None = None,
                 precision: str | None = None, amp: str | None = None,
                 compile: bool | str = False, weight_decay: float = 0.0, kl_warmup_epochs: int = 0,
                 check_finite: bool = True, max_bad_steps: int = 20,
                 on_nonfinite: str = "rollback", max_rollbacks: int = 3,
                 cache_on_device: bool = False, reuse_freed_memory: bool = True,
                 checkpoint_path: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, callbacks: Iterable[Any] = (),
                 writer: Any = None, distributed: bool | str = "auto",
                 metadata: Mapping[str, Any] | None = None, verbose: bool = True,
                 trace_func: Callable[[str], Any] = print) -> None:
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}."
            raise TypeError(msg)
        if seed is not None:
            ckpt.seed_everything(seed)
        self.seed = seed
        self.device = resolve_device(device)
        self.distributed = bool(distributed) and ddp.init_distributed(self.device)
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        #: whether glibc keeps freed buffers for the next steps (see reuse_freed_memory)
        self.reuses_freed_memory = bool(reuse_freed_memory) and self.device.type == "cpu" \
            and reuse_memory()
        self.metadata = dict(metadata or {})
        self.restore_best = restore_best
        self.weight_decay = float(weight_decay)
        self.cache_on_device = cache_on_device
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.callbacks = list(callbacks)
        self.verbose, self.trace_func = verbose, trace_func
        self.precision = resolve_precision(precision, amp, self.device)
        self.plan = TrainingPlan(self.model, self.device,
                                 amp=None if self.precision == "fp32" else self.precision,
                                 loss_weights=loss_weights, kl_warmup_epochs=kl_warmup_epochs,
                                 compile=compile)
        self.guard = NonFiniteGuard(max_bad_steps=max_bad_steps, on_nonfinite=on_nonfinite,
                                    max_rollbacks=max_rollbacks, say=self.say)
        self.step = TrainingStep(self.plan, self.guard, grad_clip=grad_clip,
                                 check_finite=check_finite, distributed=self.distributed)
        if self.plan.amp == "fp16":
            self.step.scaler = torch.amp.GradScaler("cuda")
        self.step.lower_lrs = self._scale_lrs
        self.schedule = Schedule()
        self.stoppers = StopperSet(early_stopping if isinstance(early_stopping, Mapping) else None,
                                   StopRule(stop_rule), enabled=early_stopping is not False,
                                   trace_func=trace_func)
        self.evaluator = EvaluationLoop(self.plan)
        self.records = History()
        self.logger = TensorBoardLogger(writer)
        # base of the per-epoch shuffling seeds, drawn from the (possibly seeded) torch RNG
        self.fit_loop = FitLoop(self, int(torch.randint(0, 2**31 - 1, (1,)).item()))
        self.step.check_terms = self.fit_loop.check_terms
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_spec: dict[str, Any] = {}
        self.stage = 1
        self._frozen: list[nn.Parameter] = []

    # -- state read by users ------------------------------------------------------------
    epoch = property(lambda self: self.fit_loop.epoch,
                     doc="Epochs completed so far, counted across all loops.")
    global_step = property(lambda self: self.step.global_step, doc="Optimizer steps so far.")
    n_skipped_steps = property(lambda self: self.guard.n_skipped, doc="Non-finite steps skipped.")
    n_rollbacks = property(lambda self: self.guard.n_rollbacks, doc="Rollbacks so far.")
    stop_reason = property(lambda self: self.fit_loop.stop_reason,
                           doc="Why the last loop ended early, or None.")
    lr_scheduler = property(lambda self: self.schedule.scheduler, doc="The schedule in use.")
    early_stopping = property(lambda self: self.stoppers.stoppers,
                              doc="One EarlyStopping per monitored term.")
    grad_clip = property(lambda self: self.step.grad_clip, doc="Maximum gradient norm.")
    step_history = property(lambda self: self.records.steps,
                            doc="Validation means recorded every ``valid_every`` steps.")

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch: train and ``val_`` terms, ``lr_<group>``, stage, loop,
        seconds, and whether the epoch was the best so far."""
        return self.records.frame()

    @property
    def is_main_process(self) -> bool:
        """Whether this process logs and writes files (rank 0, or not distributed)."""
        return ddp.rank() == 0

    def say(self, message: str) -> None:
        """Print a message (rank 0, verbose only)."""
        if self.verbose and self.is_main_process:
            self.trace_func(message)

    def display_enabled(self) -> bool:
        """Whether loops show the live display (verbose, rank 0, a terminal)."""
        if not self.verbose or not self.is_main_process:
            return False
        from rich.console import Console

        return Console(stderr=True).is_terminal

    def model_is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def mode_switch_to_train(self) -> None:
        """Put the model in training mode."""
        self.model.train()

    # -- optimisation -------------------------------------------------------------------
    def init_optimizer(self, lr: float = 1e-3, tune_lr: float = 1e-4, stage: int = 1,
                       tune_batch_embedding: bool = True) -> torch.optim.Optimizer:
        """Create the optimizer for a training stage.

        Stage 1 trains all parameters at ``lr``. Stage 2 trains the heads (spatial
        smoother, anchors, classifier) at ``lr`` and the pretrained backbone (gene moduler,
        CLS token, expand, transformer, readout, decoder) at ``tune_lr``; the batch
        embedding and readout train at ``tune_lr`` when the model has more than one batch
        and ``tune_batch_embedding`` is true, and are frozen otherwise. Groups are named
        (``head``, ``backbone``, ``batch``; ``all`` in stage 1) and the learning rate of
        each is recorded in :attr:`history`. The schedule is rebuilt for the new optimizer.
        """
        self.optimizer, self._frozen = build_optimizer(
            self.model, self._frozen, lr=lr, tune_lr=tune_lr, stage=stage,
            tune_batch_embedding=tune_batch_embedding, weight_decay=self.weight_decay)
        self.step.optimizer = self.optimizer
        self.stage = stage
        self.optimizer_spec = {"lr": float(lr), "tune_lr": float(tune_lr), "stage": int(stage),
                               "tune_batch_embedding": bool(tune_batch_embedding)}
        self.schedule.forget()
        return self.optimizer

    def _scale_lrs(self, factor: float) -> bool:
        lowered = True
        for group in self.optimizer.param_groups:
            new = group["lr"] * factor
            lowered = lowered and 0 < new < group["lr"]
            group["lr"] = new
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        self.schedule.scale_base_lrs(factor)
        return lowered

    def set_lr_scheduler(self, lr_scheduler: Any = None, *, kind: str = "multistep",
                         milestones: Iterable[int] | None = None, gamma: float = 0.5,
                         monitor: str = "total_loss", factor: float = 0.5, patience: int = 5,
                         min_lr: float = 0.0) -> None:
        """Choose the learning-rate schedule, stepped once per epoch.

        Parameters
        ----------
        lr_scheduler
            A ready scheduler for :attr:`optimizer`, or a function ``optimizer ->
            scheduler``; its state is saved in checkpoints and restored into the instance
            passed again after a restart. When given, the keyword options are ignored.
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
            self.schedule.set_custom(lr_scheduler, self.optimizer)
            return
        self.schedule.configure(kind=kind, milestones=milestones, gamma=gamma, monitor=monitor,
                                factor=factor, patience=patience, min_lr=min_lr)

    def update_model_params(self, loss_dict: Mapping[str, Any], epoch: int | None = None
                            ) -> torch.Tensor:
        """Backpropagate the weighted sum of the loss terms and step the optimizer.

        Gradients are clipped to :attr:`grad_clip` when set; a step whose loss or gradient
        is not finite is skipped (see the non-finite guard). Returns the detached total.
        """
        return self.step(loss_dict)

    # -- losses -------------------------------------------------------------------------
    def kl_weight(self) -> float | None:
        """The KL weight of the current epoch under warm-up, or None (model default)."""
        return self.plan.kl_weight()

    def to_device(self, inputs: Any) -> Any:
        """Move a tensor, or the tensors inside a dict/list/tuple, to the trainer's device."""
        return self.plan.to_device(inputs)

    def handle_input_tuple(self, input_tuple: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one mini-batch (a loader's batch dict or a tuple of tensors)."""
        return self.plan.loss(as_inputs(input_tuple))

    def handle_ginput_tuple(self, graph: Any, dataset: Any, mask: torch.Tensor | None = None,
                            *, end_to_end: bool = False) -> dict[str, torch.Tensor]:
        """Loss terms of one (sub-)graph, over the nodes where ``mask`` is true."""
        return self.plan.graph_loss(graph, dataset, mask, end_to_end=end_to_end)

    @staticmethod
    def cum_loss(loss_dict: Mapping[str, Any], total_loss_dict: RunningMeans | None = None,
                 n_obs: int = 1) -> RunningMeans:
        """Add one step's loss terms (detached, weighted by ``n_obs``) to running means."""
        total_loss_dict = RunningMeans() if total_loss_dict is None else total_loss_dict
        total_loss_dict.add(loss_dict, n_obs)
        return total_loss_dict

    def format_loss_dict(self, loss_dict: Mapping[str, float],
                         valid_loss_dict: Mapping[str, float] | None = None) -> str:
        """One line per term: ``term: train …, val …, best …``."""
        best = self.stoppers.best_values()
        lines = []
        for term, value in loss_dict.items():
            parts = [f"{term}: train {float(value):.4g}"]
            val = None if valid_loss_dict is None else valid_loss_dict.get(f"val_{term}")
            if val is not None:
                parts.append(f"val {val:.4g}")
            if term in best:
                parts.append(f"best {best[term]:.4g}")
            lines.append(", ".join(parts))
        return "\n".join(lines)

    # -- early stopping -----------------------------------------------------------------
    def setup_early_stopping(self, loss_dict: Mapping[str, Any]) -> dict[str, EarlyStopping]:
        """Create one :class:`EarlyStopping` per loss term (and ``total_loss``)."""
        return self.stoppers.setup(loss_dict)

    def check_early_stop(self, total_loss_dict: Mapping[str, float]) -> bool:
        """Step every stopper with this epoch's values (validation values when present);
        return whether the stop rule says stop."""
        stop, _, reason = self.stoppers.step(total_loss_dict, self.epoch)
        if stop:
            self.fit_loop.stop_reason = reason
        return stop

    def request_stop(self, reason: str) -> None:
        """Ask the running loop to stop after the current epoch (used by callbacks)."""
        self.fit_loop.stop_request = reason

    # -- loops --------------------------------------------------------------------------
    def fit(self, source: BatchSource, epochs: int, *, display: Any = None) -> bool:
        """Run a loop over any batch source; the four ``train*`` methods call this."""
        return self.fit_loop.run(source, epochs, display)

    # -- validation and inference -------------------------------------------------------
    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        source.bind(self.plan, self.fit_loop.shard())
        return self.evaluator.run(source.validation_batches() or [])

    def validate_loader(self, loader: Iterable, call_func: Callable | None = None
                        ) -> dict[str, float]:
        """Mean loss terms over ``loader`` in eval mode without gradients (``val_<term>``)."""
        return self._evaluate(MiniBatchSource((loader, loader), call_func))

    def validate_X(self, X: Any, ind: Any = None, call_func: Callable | None = None
                   ) -> dict[str, float]:
        """Mean loss terms on the rows ``ind`` of ``X`` (all rows when None), in eval mode."""
        ind = np.arange(len(X) if hasattr(X, "subset") else len(as_inputs(X)["x"])
                        ) if ind is None else ind
        return self._evaluate(FullMatrixSource(X, ind, ind, call_func))

    def validate_gloader(self, gloader: Iterable, dataset: Any, valid_ind: Any = None, *,
                         end_to_end: bool = False) -> dict[str, float]:
        """Mean loss terms on the ``valid_ind`` nodes (all when None) of every graph."""
        ind = np.arange(len(dataset)) if valid_ind is None else valid_ind
        return self._evaluate(GraphBatchSource(gloader, dataset, None, ind,
                                               end_to_end=end_to_end, evaluate_only=True))

    def predict(self, data: Any, *, batch_size: int = 1024, method: str = "embed") -> np.ndarray:
        """Apply ``model.<method>`` to every item of a dataset in batches, in eval mode.

        Returns a NumPy array in dataset order (the embedding by default: the posterior
        mean, never a random sample).
        """
        return predict(self.plan, data, batch_size=batch_size, method=method)

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
                f"stage={self.stage}, epoch={self.epoch}, "
                f"stop_rule={self.stoppers.rule.rule!r})")

