"""What the single-cell and spatial workflows share: data preparation, the model, the
Trainer, batched inference, and saving to / loading from a run directory."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from step._constants import MODES
from step.functionality.comps.trainer import (
    ConvergenceProbe,
    NonFiniteError,
    Trainer,
    read_checkpoint,
    seed_everything,
)
from step.models import TranscriptFormer
from step.utils.dataset import BaseDataset, ScDataset, index_loader
from step.utils.ondisk import OnDiskDataset
from step.utils.preprocess import check_n_top_genes, prepare_counts
from step.utils.validation import (
    check_adata,
    check_in_memory,
    check_obs_key,
    check_obsm_key,
    check_unique_names,
)
from step.workflows import _io, _ondisk_input

__all__ = ["CHECKPOINT_FILE", "Workflow"]

#: Name of the checkpoint file written into ``checkpoint_dir``.
CHECKPOINT_FILE = "checkpoint.pt"
_DEFAULT_CHECKPOINT_EVERY = 5


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return int(value)


def _check_rate(name: str, value: Any) -> float:
    """A learning rate: a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"{name} must be a positive finite number, got {value!r}."
        raise TypeError(msg)
    if not (math.isfinite(float(value)) and float(value) > 0):
        msg = f"{name} must be a positive finite number, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _check_seed(seed: Any) -> int:
    """A seed every generator accepts: an integer in ``[0, 2**32)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        msg = f"seed must be an integer, got {seed!r}."
        raise TypeError(msg)
    if not 0 <= seed < 2**32:
        msg = f"seed must be an integer in [0, 2**32), got {seed!r}."
        raise ValueError(msg)
    return int(seed)


def _shown(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _difference(key: str, stored: Any, here: Any) -> str:
    """One line saying how a checkpoint's metadata value differs from this run's."""
    if isinstance(stored, list) and isinstance(here, list):
        only_stored = [v for v in stored if v not in set(here)]
        only_here = [v for v in here if v not in set(stored)]
        if not only_stored and not only_here:
            return f"{key}: the same {len(here)} values in another order"
        return (f"{key}: {len(stored)} in the checkpoint, {len(here)} here; in the checkpoint "
                f"only: {_shown(only_stored)}; here only: {_shown(only_here)}")
    return f"{key}: {stored!r} in the checkpoint, {here!r} here"


def _resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when available, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = f"device must be 'cpu', 'cuda', 'cuda:<n>', 'auto' or a torch.device; got {device!r}."
        raise ValueError(msg) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'."
        raise ValueError(msg)
    return resolved


def _check_input(adata: Any, *, for_training: bool = True, allow_backed: bool = False) -> ad.AnnData:
    """An AnnData with unique gene names (and at least two cells to train on), in memory
    unless ``allow_backed``."""
    check_adata(adata)
    if not allow_backed:
        check_in_memory(adata)
    check_unique_names(adata, axis="var")
    if for_training and adata.n_obs < 2:
        msg = (f"the AnnData object has {adata.n_obs} cell(s); training needs at least 2 "
               "(one to train on and one to validate on).")
        raise ValueError(msg)
    return adata


def _check_key_added(key_added: Any) -> str:
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise TypeError(msg)
    return key_added


def _plain(values: Sequence[Any] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


class Workflow:
    """Base of :class:`~step.workflows.scModel` and :class:`~step.workflows.stModel`.

    Holds a reference to the caller's AnnData (results are written there, under the
    documented keys only), a prepared copy of its counts, the dataset over that copy,
    the model and, once trained, the :class:`~step.functionality.comps.trainer.Trainer`.
    """

    #: Name recorded in ``config.json`` and checked by :meth:`load`.
    workflow_name = "Workflow"
    #: Whether on-disk input (a backed AnnData, paths of .h5ad/.zarr files) is trained
    #: on from disk.
    supports_backed = False
    #: ``Trainer(precision=...)`` when the caller gives neither ``precision`` nor ``amp``:
    #: bf16 where the hardware computes it natively, fp32 elsewhere. Both workflows gave
    #: the quality of fp32 in bf16 (``benchmarks/quality.py``,
    #: ``benchmarks/spatial_quality.py --precision bf16``).
    default_precision = "auto"

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        class_key: str | None = None,
        n_top_genes: int | None = None,
        genes: Sequence[str] | None = None,
        hidden_dim: int = 64,
        n_modules: int = 32,
        module_dim: int = 30,
        n_layers: int = 2,
        likelihood: str = "zinb",
        seed: int = 0,
        device: str | torch.device = "cpu",
        model_kw: Mapping[str, Any] | None = None,
        _genes: Sequence[str] | None = None,
        _categories: Mapping[str, Sequence[str] | None] | None = None,
        _model_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._sources = _ondisk_input.on_disk_sources(adata) if self.supports_backed else None
        if isinstance(genes, str):
            msg = f"genes must be a list of gene names, got the single string {genes!r}."
            raise TypeError(msg)
        self.requested_genes = None if genes is None else [str(g) for g in genes]
        if self._sources is not None and not (isinstance(adata, ad.AnnData) and adata.isbacked):
            # results go into an AnnData holding the files' obs and genes, without counts
            adata = _ondisk_input.annotations(self._sources, layer=layer,
                                              genes=_genes or self.requested_genes)
        # load() may embed one cell
        _check_input(adata, for_training=_genes is None, allow_backed=self.supports_backed)
        seed = _check_seed(seed)
        for key, role in ((batch_key, "batch_key"), (class_key, "class_key")):
            if key is not None and _categories is None:
                check_obs_key(adata, key, role=role)
        self.adata = adata
        self.layer = layer
        self.batch_key = batch_key
        self.class_key = class_key
        self.n_top_genes = n_top_genes
        self.seed = int(seed)
        self.device = _resolve_device(device)
        self._categories = dict(_categories or {})
        self._prepare(adata, genes=_genes)
        self.genes: list[str] = [str(g) for g in self._prepared.var_names]

        seed_everything(self.seed)
        if _model_config is None:
            config = dict(model_kw or {})
            config.update(n_modules=n_modules, module_dim=module_dim, hidden_dim=hidden_dim,
                          n_layers=n_layers, likelihood=likelihood,
                          n_batches=self.dataset.n_batches)
            self.model = TranscriptFormer(len(self.genes), **config)
        else:
            self.model = TranscriptFormer.from_config(_model_config)
        self.model.to(self.device)
        self.trainer: Trainer | None = None
        self._history = pd.DataFrame()

    # ----------------------------------------------------------------- data
    def _prepare(self, adata: ad.AnnData, *, genes: Sequence[str] | None) -> None:
        """Prepare the counts on a copy and build :attr:`dataset` over it.

        ``genes`` (a saved model's or a checkpoint's) are used as they are; otherwise the
        requested genes are kept and ``n_top_genes`` of them selected.
        """
        fixed = genes is not None
        wanted = genes if fixed else self.requested_genes
        if wanted is not None:
            _io.check_genes(adata.var_names, wanted)
        n_top = None if fixed else self.n_top_genes
        if self._sources is not None:
            self._prepare_on_disk(adata, genes=wanted, n_top_genes=n_top)
            return
        self._prepared = prepare_counts(
            adata, layer=self.layer, n_top_genes=n_top,
            batch_key=None if fixed else self.batch_key, genes=wanted)
        self._align_categories(self._prepared)
        self.dataset = self._make_dataset(self._prepared)
        self._remember_categories()

    def _remember_categories(self) -> None:
        if self._categories.get("batch") is None:
            self._categories["batch"] = self.dataset.batch_categories
        if self._categories.get("class") is None:
            self._categories["class"] = self.dataset.class_categories

    def _prepare_on_disk(self, adata: ad.AnnData, *, genes: Sequence[str] | None,
                         n_top_genes: int | None) -> None:
        """Build :attr:`dataset` over the files, leaving the counts on disk.

        ``n_top_genes`` are selected in one streaming pass over the counts (the same
        selection as in memory); :attr:`_prepared` then holds only obs and the genes.
        """
        names = [str(g) for g in (adata.var_names if genes is None else genes)]
        check_n_top_genes(n_top_genes)
        if n_top_genes is not None and n_top_genes < len(names):
            if self.batch_key is not None:
                check_obs_key(adata, self.batch_key, role="batch_key")
            batches = None if self.batch_key is None else adata.obs[self.batch_key].to_numpy()
            names = _ondisk_input.selected_genes(self._sources, names, int(n_top_genes),
                                                 layer=self.layer, batches=batches)
        self._prepared = ad.AnnData(obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(names)))
        self._align_categories(self._prepared)
        obs = self._prepared.obs
        self.dataset = OnDiskDataset(
            self._sources, layer=self.layer, genes=names, obs=obs, mode=MODES.BATCH,
            batch_key=self.batch_key if self.batch_key in obs.columns else None,
            class_key=self.class_key if self.class_key in obs.columns else None)
        self._remember_categories()

    def _align_categories(self, prepared: ad.AnnData, *, with_class: bool = True) -> None:
        """Give the batch/class columns of the (private) copy the saved category order."""
        roles = [("batch", self.batch_key)] + ([("class", self.class_key)] if with_class else [])
        for role, key in roles:
            known = self._categories.get(role)
            if key is None or known is None:
                continue
            if key not in prepared.obs.columns:
                # embedding needs neither: the encoder does not read batches (batch 0 is
                # used) and labels only enter the refinement loss
                continue
            values = prepared.obs[key].astype(str)
            unknown = sorted(set(values) - set(known))
            if unknown:
                msg = (f"{role}es {unknown[:10]} in obs[{key!r}] are unknown to the model, which "
                       f"was trained on {list(known)}.")
                raise ValueError(msg)
            prepared.obs[key] = pd.Categorical(values, categories=list(known))

    def _make_dataset(self, prepared: ad.AnnData, *, with_class: bool = True) -> BaseDataset:
        batch_key = self.batch_key if self.batch_key in prepared.obs.columns else None
        class_key = self.class_key if with_class and self.class_key in prepared.obs.columns \
            else None
        return ScDataset(prepared, batch_key=batch_key, class_key=class_key, mode=MODES.BATCH)

    def _prepare_other(self, adata: ad.AnnData) -> ad.AnnData:
        """A private copy of other data with the model's genes, in the model's order."""
        _check_input(adata, for_training=False)
        _io.check_genes(adata.var_names, self.genes)
        prepared = prepare_counts(adata, layer=self.layer, genes=self.genes)
        # labels of other data are never trained on, so only batches are aligned
        self._align_categories(prepared, with_class=False)
        return prepared

    def _dataset_for(self, adata: ad.AnnData | None) -> BaseDataset:
        """The training dataset, or a dataset over another AnnData with the model's genes."""
        if adata is None or adata is self.adata:
            return self.dataset
        return self._make_dataset(self._prepare_other(adata), with_class=False)

    # -------------------------------------------------------------- training
    def _make_trainer(
        self,
        *,
        checkpoint_dir: str | os.PathLike | None,
        probe: Mapping[str, Any] | None,
        verbose: bool,
        trainer_kw: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> Trainer:
        kw = dict(trainer_kw)
        kw["metadata"] = {**(metadata if metadata is not None else self._metadata()),
                          **dict(kw.get("metadata") or {})}
        callbacks = list(kw.pop("callbacks", ()))
        if probe is not None:
            if not isinstance(probe, Mapping):
                msg = f"probe must be None or a dict of ConvergenceProbe options, got {probe!r}."
                raise TypeError(msg)
            callbacks.append(ConvergenceProbe(self.dataset, **{"seed": self.seed, **probe}))
        if checkpoint_dir is not None:
            kw.setdefault("checkpoint_path", Path(checkpoint_dir) / CHECKPOINT_FILE)
            kw.setdefault("checkpoint_every", _DEFAULT_CHECKPOINT_EVERY)
        kw.setdefault("distributed", False)
        if "precision" not in kw and "amp" not in kw:
            kw["precision"] = self.default_precision
        self.trainer = Trainer(self.model, device=self.device, seed=self.seed,
                               callbacks=callbacks, verbose=verbose, **kw)
        return self.trainer

    def _metadata(self) -> dict[str, Any]:
        """What a checkpoint records and a resumed run must match: plain values only."""
        return {"workflow": self.workflow_name, "genes": list(self.genes), "layer": self.layer,
                "batch_key": self.batch_key, "class_key": self.class_key,
                "batch_categories": _plain(self._categories.get("batch")),
                "class_categories": _plain(self._categories.get("class"))}

    def _check_resume(self, path: str | os.PathLike,
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Read a checkpoint to resume and check that it fits this data and these settings.

        A checkpoint over the same genes in another order is accepted: the prepared copy
        of the data is reordered to the checkpoint's gene order. Any other difference in
        the recorded metadata (:meth:`_metadata` updated with ``extra``) is refused with a
        ``ValueError`` listing every difference.
        """
        state = read_checkpoint(path)
        stored = dict(state.get("metadata") or {})
        where = os.fspath(path)
        if "genes" not in stored:
            msg = (f"checkpoint {where!r} records no gene names, so it cannot be checked "
                   "against these data; resume from a checkpoint written by this version of "
                   "step's workflows or command line.")
            raise ValueError(msg)
        genes = [str(g) for g in stored["genes"]]
        if genes != self.genes and len(genes) == len(self.genes) and set(genes) == set(
                self.genes):
            self._reorder_genes(genes)
        here = {**self._metadata(), **dict(extra or {})}
        diffs = [_difference(key, stored[key], here[key])
                 for key in sorted(set(stored) & set(here)) if stored[key] != here[key]]
        if diffs:
            msg = (f"checkpoint {where!r} was written for other data or settings: "
                   + "; ".join(diffs) + ". Resume with the data and settings of the run that "
                   "wrote it, or train without resume.")
            raise ValueError(msg)
        return state

    def _reorder_genes(self, genes: Sequence[str]) -> None:
        """Prepare the data again with its genes in ``genes``' order."""
        self._prepare(self.adata, genes=genes)
        self.genes = [str(g) for g in self._prepared.var_names]

    def _final_checkpoint(self) -> None:
        """Write the state at the end of training where periodic checkpoints go."""
        trainer = self.trainer
        if trainer is not None and trainer.checkpoint_path is not None:
            trainer.save_checkpoint(trainer.checkpoint_path)

    def _require_trainer(self, what: str) -> Trainer:
        if self.trainer is None:
            msg = f"{what} needs a trained model; call run() first."
            raise RuntimeError(msg)
        return self.trainer

    @property
    def history(self) -> pd.DataFrame:
        """Training history: one row per epoch (loss terms, ``val_`` terms, learning rate
        per parameter group, stage, loop, seconds). Empty before training."""
        if self.trainer is not None and len(self.trainer.history):
            return self.trainer.history
        return self._history.copy()

    # ------------------------------------------------------------- inference
    def _infer(self, dataset: BaseDataset, *, method: str = "embed",
               batch_size: int = 1024) -> np.ndarray:
        """Apply ``model.<method>`` to every item in eval mode, in dataset order."""
        batch_size = _check_positive_int("batch_size", batch_size)
        fn = getattr(self.model, method)
        loader = index_loader(dataset, batch_size, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        outs = []
        try:
            with torch.no_grad():
                for inputs in loader:
                    inputs = {k: v.to(self.device) for k, v in inputs.items()}
                    outs.append(fn(inputs).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(outs).numpy()

    def _write_obsm(self, results: Mapping[str, np.ndarray]) -> None:
        """Write embeddings into the caller's AnnData, all or none.

        Raises :class:`~step.functionality.comps.trainer.NonFiniteError` (and writes
        nothing) when any of them holds NaN or infinite values.
        """
        checked = {}
        for key, values in results.items():
            values = np.asarray(values, dtype=np.float32)
            n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if n_bad:
                msg = (f"the embedding for obsm[{key!r}] holds {n_bad} NaN or infinite values "
                       f"of {values.size}; nothing was written into the AnnData. Lower the "
                       "learning rate, set grad_clip, or check the input counts.")
                raise NonFiniteError(msg)
            checked[_check_key_added(key)] = values
        for key, values in checked.items():
            self.adata.obsm[key] = values

    def _require_obsm(self, key: str) -> np.ndarray:
        check_obsm_key(self.adata, key, role="use_rep")
        return np.asarray(self.adata.obsm[key])

    # ------------------------------------------------------------ save/load
    def _settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "batch_key": self.batch_key, "class_key": self.class_key,
                "n_top_genes": self.n_top_genes, "seed": self.seed}

    def save(self, dir: str | os.PathLike) -> Path:
        """Save the model, its settings and its training history into a folder.

        Files are written atomically (temporary file, then rename): ``model.pt`` (the
        model's ``state_dict``; tensors only, read back with ``weights_only=True``),
        ``config.json`` (model configuration, genes, workflow settings, batch/class
        categories, package version) and ``history.csv``. Nothing is written into the
        AnnData.

        Parameters
        ----------
        dir
            Folder to write into (created when missing).

        Returns
        -------
        The folder.

        Raises
        ------
        ~step.functionality.comps.trainer.NonFiniteError
            If a weight is NaN or infinite (nothing is written).
        """
        import step

        bad = [name for name, value in self.model.state_dict().items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            msg = (f"the model holds NaN or infinite weights ({_shown(bad)}); it was not "
                   "saved. Train again with a lower learning rate or grad_clip.")
            raise NonFiniteError(msg)
        folder = Path(dir)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _io.FORMAT_VERSION,
            "workflow": self.workflow_name,
            "step_version": step.__version__,
            "torch_version": torch.__version__,
            "model": self.model.config,
            "genes": self.genes,
            "settings": self._settings(),
            "categories": {"batch": self._categories.get("batch"),
                           "class": self._categories.get("class")},
        }
        _io.write_state_dict(self.model.state_dict(), folder / _io.MODEL_FILE)
        _io.write_config(config, folder / _io.CONFIG_FILE)
        _io.write_history(self.history, folder / _io.HISTORY_FILE)
        return folder

    @classmethod
    def _read_saved(cls, dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any],
                                                          pd.DataFrame]:
        folder = Path(dir)
        if not folder.is_dir():
            msg = f"{os.fspath(folder)!r} is not a folder written by save()."
            raise FileNotFoundError(msg)
        config = _io.read_config(folder / _io.CONFIG_FILE, workflow=cls.workflow_name)
        state = _io.read_state_dict(folder / _io.MODEL_FILE)
        history_path = folder / _io.HISTORY_FILE
        history = pd.read_csv(history_path) if history_path.is_file() and (
            history_path.stat().st_size > 1) else pd.DataFrame()
        return config, state, history

    @staticmethod
    def _restore_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments of :meth:`Workflow.__init__` that rebuild a saved workflow."""
        settings = config["settings"]
        return {"layer": settings["layer"], "batch_key": settings["batch_key"],
                "class_key": settings["class_key"], "n_top_genes": settings["n_top_genes"],
                "seed": settings["seed"], "_genes": config["genes"],
                "_categories": config["categories"], "_model_config": config["model"]}

    def _load_weights(self, state: Mapping[str, torch.Tensor], history: pd.DataFrame) -> None:
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            msg = f"the saved weights do not fit the saved model configuration: {err}"
            raise ValueError(msg) from err
        self.model.to(self.device)
        self._history = history

    def __repr__(self) -> str:
        trained = "untrained" if self.trainer is None and self._history.empty else "trained"
        return (f"{type(self).__name__}(n_obs={len(self.dataset)}, n_genes={len(self.genes)}, "
                f"n_batches={self.dataset.n_batches}, {trained})")
