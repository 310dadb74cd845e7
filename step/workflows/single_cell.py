"""Single-cell workflow: embed one or several batches, then optionally refine with labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from step._constants import ADATA_KEYS, MODES
from step.functionality.comps.trainer import make_loaders
from step.workflows._base import Workflow, _check_key_added, _check_positive_int, _check_rate

__all__ = ["scModel"]


class scModel(Workflow):  # noqa: N801 - the name users know from STEP
    """TranscriptFormer embedding of single-cell counts, with staged label refinement.

    The counts are prepared on a copy of ``adata`` (:func:`step.utils.prepare_counts`:
    integer counts, optional highly-variable genes); ``adata`` itself only receives the
    documented result keys. With a ``batch_key`` naming several batches the model gets a
    batch embedding that feeds its decoder, so the encoder's latent space is shared by
    all batches.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw integer counts in ``X`` or ``layers[layer]``, or
        data left on disk and read in mini-batches
        (:class:`~step.utils.ondisk.OnDiskDataset`; CSR counts): an AnnData opened with
        ``anndata.read_h5ad(path, backed="r")``, the path of an ``.h5ad`` file or a
        ``.zarr`` store, or a list of these read as one collection (rows concatenated in
        order, genes matched by name; cell names must be unique across the files). For
        paths, ``model.adata`` is an AnnData without counts holding the files' obs and the
        genes, and receives the results.
    layer
        Layer with the counts; ``None`` reads ``X``.
    batch_key
        obs column with batches (integration); ``None`` for one batch.
    class_key
        obs column with cell labels; needed by :meth:`refine`, and used to stratify the
        validation split.
    n_top_genes
        Keep this many highly variable genes (batch-aware with ``batch_key``); ``None``
        keeps all genes. For on-disk data they are selected in one pass over blocks of
        rows, with the same result as in memory
        (:func:`~step.utils.streaming_hvg.highly_variable_from_blocks`).
    genes
        Train on these genes only, in this order (every one must be in the data);
        ``n_top_genes`` then selects among them. ``None`` uses every gene.
    hidden_dim, n_modules, module_dim, n_layers
        Architecture of :class:`~step.models.TranscriptFormer` (width, gene-module tokens,
        token size, transformer layers).
    latent_dim
        Size of the embedding ``X_rep``.
    likelihood
        Count likelihood: ``"nb"``, ``"zinb"`` or ``"poisson"``.

        The defaults, a 16-dimensional latent space and a negative binomial likelihood
        (rather than the model's 64 dimensions, the transformer width, and a
        zero-inflated one), come from ``benchmarks/quality_tuning.py``: on the PBMC
        counts, over three seeds, Leiden clusters of ``X_rep`` matched the cell labels
        better at a fixed resolution (ARI against ``bulk_labels`` at resolution 0.5 /
        1.0 / 10 clusters: 0.569 / 0.390 / 0.535, against 0.409 / 0.344 / 0.450 before).
        With 64 dimensions nearly all of the embedding's variance sat in a handful of
        directions, and a smaller latent space helped with either likelihood; UMI counts
        need no zero inflation, and without it the 10-cluster agreement rose most.
    dropout
        Dropout in the encoder (the transformer's residual branches and the readout).
        0 (rather than the model's 0.1) because dropout concentrated the embedding's
        variance in fewer directions (participation ratio of the singular values 4.3
        against 6.1 without it, PBMC, three seeds), and the kNN graph of such an
        embedding splits into more Leiden communities at a given resolution: at 1.0,
        scanpy's default, it gave 12-13 clusters for the 10 cell labels, and 10-12
        without dropout. ARI against ``bulk_labels`` at resolution 0.5 / 1.0 / 10
        clusters: 0.590 / 0.501 / 0.512 without dropout, 0.569 / 0.390 / 0.535 with 0.1
        (``benchmarks/quality_tuning.py``, ``benchmarks/quality.py``).
    kl_weight
        Weight of the KL term. 0.1 (rather than the model's 1.0) gave clusters that match
        the PBMC cell labels better (Leiden ARI against ``bulk_labels`` over three seeds:
        0.49 instead of 0.38 at 10 clusters, 0.59 instead of 0.53 at the best resolution,
        measured with the earlier 64 latent dimensions and zero-inflated likelihood; see
        ``benchmarks/quality.py``).
    seed
        Seeds the model initialisation, the split, shuffling and training.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"`` (CUDA when available) or a
        :class:`torch.device`.
    **model_kw
        Other :class:`~step.models.TranscriptFormer` arguments (``n_heads``,
        ``dispersion``, ``free_bits``, ...).

    Examples
    --------
    >>> from step.datasets import pbmc68k_counts
    >>> from step.workflows import scModel
    >>> adata = pbmc68k_counts()
    >>> model = scModel(adata, class_key="bulk_labels")
    >>> history = model.run(epochs=100)           # writes adata.obsm["X_rep"]
    >>> history = model.refine(epochs=30)         # writes adata.obsm["X_anchord"]
    >>> model.save("run")                         # model.pt, config.json, history.csv
    """

    workflow_name = "scModel"
    supports_backed = True

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
        latent_dim: int = 16,
        likelihood: str = "nb",
        kl_weight: float = 0.1,
        dropout: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        **model_kw: Any,
    ) -> None:
        super().__init__(
            adata, layer=layer, batch_key=batch_key, class_key=class_key,
            n_top_genes=n_top_genes, genes=genes, hidden_dim=hidden_dim, n_modules=n_modules,
            module_dim=module_dim, n_layers=n_layers, likelihood=likelihood, seed=seed,
            device=device, model_kw={"latent_dim": latent_dim, "kl_weight": kl_weight,
                                     "dropout": dropout, **model_kw},
        )

    # -------------------------------------------------------------- training
    def run(
        self,
        *,
        epochs: int = 100,
        batch_size: int = 128,
        lr: float = 1e-3,
        split_rate: float = 0.2,
        key_added: str | None = ADATA_KEYS.X_REP,
        probe: Mapping[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        verbose: bool = True,
        steps_per_epoch: int | None = None,
        block_size: int | None = None,
        buffer_blocks: int = 16,
        **trainer_kw: Any,
    ) -> pd.DataFrame:
        """Train on the counts (stage 1) and write the embedding.

        A stratified random validation split (by ``class_key`` when given, else by
        ``batch_key``, else plain random; seeded) is held out and evaluated every epoch;
        :meth:`Trainer.train_batch <step.functionality.comps.trainer.Trainer.train_batch>`
        trains all parameters at ``lr`` and early-stops per loss term.

        Parameters
        ----------
        epochs
            Most epochs.
        batch_size
            Cells per mini-batch.
        lr
            Learning rate (Adam).
        split_rate
            Fraction of cells held out for validation, in ``[0, 1)``.
        key_added
            obsm key of the embedding; ``None`` computes none (for data larger than
            memory, stream it to a file with :func:`step.utils.embed_to_h5ad`).
        probe
            Options of a :class:`~step.functionality.comps.trainer.ConvergenceProbe`
            (e.g. ``{"every": 5, "n_clusters": 10}``) that stops training once the
            clustering of the embedding stops changing; ``None`` for no probe.
        checkpoint_dir
            Folder for ``checkpoint.pt``, written every ``checkpoint_every`` epochs
            (default 5), when training is interrupted (Ctrl-C, SIGTERM; the interruption
            is then raised again) and when it ends.
        resume
            A checkpoint to continue from (written by a run with the same settings).
        verbose
            Live progress display and stop messages.
        steps_per_epoch
            End each epoch after this many mini-batches (each epoch draws a new shuffled
            order), so that validation, early stopping, checkpoints and resume happen every
            ``steps_per_epoch`` steps on data too large for full passes; ``None`` for one
            full pass per epoch.
        block_size, buffer_blocks
            Block shuffling of the training batches
            (:class:`~step.utils.block_sampler.BlockBatchSampler`): contiguous blocks of
            ``block_size`` rows in random order, rows shuffled within ``buffer_blocks``
            blocks, so that a batch from disk reads a few contiguous ranges. ``None``
            shuffles single rows.
        **trainer_kw
            Other :class:`~step.functionality.comps.trainer.Trainer` arguments
            (``early_stopping``, ``stop_rule``, ``kl_warmup_epochs``, ``grad_clip``,
            ``weight_decay``, ``precision``, ``checkpoint_every``, ``callbacks``, ...).
            ``precision`` defaults to ``"auto"`` here: bfloat16 autocast where the CPU or
            GPU computes it natively (AMX-BF16 or AVX512-BF16; CUDA compute capability
            8.0 or newer), fp32 elsewhere. On the PBMC counts, three seeds, bf16 gave the
            embedding quality of fp32 (Leiden ARI against ``bulk_labels`` at resolution
            0.5 / 1.0 / 10 clusters: 0.590 / 0.507 / 0.514 against 0.590 / 0.501 / 0.512,
            ``benchmarks/quality.py``) in 0.62 times the training time. Pass
            ``precision="fp32"`` for full precision on every machine.

        Returns
        -------
        The training history (also :attr:`history`). Sets
        ``adata.obsm[key_added]``: float32 ``(n_obs, latent_dim)`` posterior means
        computed in eval mode.
        """
        epochs = _check_positive_int("epochs", epochs)
        lr = _check_rate("lr", lr)
        if key_added is not None:
            _check_key_added(key_added)
        for name, value in (("steps_per_epoch", steps_per_epoch), ("block_size", block_size)):
            if value is not None:
                _check_positive_int(name, value)
        _check_positive_int("buffer_blocks", buffer_blocks)
        if resume is not None:
            self.check_resume(resume)
        trainer = self._make_trainer(checkpoint_dir=checkpoint_dir, probe=probe,
                                     verbose=verbose, trainer_kw=trainer_kw)
        self.dataset.set_mode(MODES.BATCH)
        loaders = make_loaders(self.dataset, batch_size, split_rate, obs_key=self._split_key(),
                               seed=self.seed, block_size=block_size, buffer_blocks=buffer_blocks)
        trainer.init_optimizer(lr=lr, stage=1)
        if resume is not None:
            trainer.load_checkpoint(resume)
        trainer.train_batch(epochs, loaders, steps_per_epoch=steps_per_epoch)
        self._final_checkpoint()
        if key_added is not None:
            self._write_obsm({key_added: self._infer(self.dataset)})
        return self.history

    def check_resume(self, resume: str | os.PathLike) -> None:
        """Check that a checkpoint can be resumed by :meth:`run` on these data.

        :meth:`run` makes the same check; calling it first tells before any other work
        whether ``resume`` fits. A checkpoint of the same genes in another order is
        accepted and the prepared copy of the data is put in the checkpoint's gene order
        (the caller's AnnData is not changed).

        Parameters
        ----------
        resume
            A checkpoint written by :meth:`run`.

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        ValueError
            If the file is not a readable checkpoint, was written by :meth:`refine`, or
            records other genes or settings (layer, batch and class keys and categories);
            the message lists every difference.
        """
        state = self._check_resume(resume)
        if int(state["counters"].get("stage", 1)) != 1:
            msg = (f"checkpoint {os.fspath(resume)!r} was written by refine() (stage 2); run() "
                   "resumes checkpoints of its own stage-1 training only.")
            raise ValueError(msg)

    def _split_key(self) -> str | None:
        if self.class_key is not None and self.class_key in self._prepared.obs.columns:
            return self.class_key
        if self.batch_key is not None and self.batch_key in self._prepared.obs.columns:
            return self.batch_key
        return None

    def refine(
        self,
        *,
        epochs: int = 30,
        lr: float = 1e-3,
        tune_lr: float = 1e-4,
        batch_size: int = 128,
        split_rate: float = 0.2,
        key_added: str = ADATA_KEYS.X_ANCHORED,
        temperature: float = 1.0,
        mix: float = 0.5,
        verbose: bool = True,
    ) -> pd.DataFrame:
        """Fine-tune with the class labels (stage 2) and write the anchored embedding.

        Class anchors start at the class means of the current embedding
        (:meth:`TranscriptFormer.init_anchors <step.models.TranscriptFormer.init_anchors>`).
        The optimizer is rebuilt once for stage 2 with two learning rates: anchors and
        classifier at ``lr``, the pretrained backbone (gene moduler, CLS token, expand,
        transformer, readout, decoder) at ``tune_lr``, the batch embedding at ``tune_lr``
        when there are several batches; it is not replaced afterwards, so the history's
        ``lr_head`` and ``lr_backbone`` columns show both rates. The optimised loss is what
        ``model.loss`` returns with labels: ``cl_loss`` (cross-entropy against the anchors)
        plus ``recon_loss`` and ``kl_loss``, which keep the backbone a good count model.

        Parameters
        ----------
        epochs
            Most epochs.
        lr
            Learning rate of the new heads (anchors, classifier).
        tune_lr
            Learning rate of the backbone.
        batch_size
            Cells per mini-batch.
        split_rate
            Fraction of cells held out (stratified by class) for validation.
        key_added
            obsm key of the anchored embedding.
        temperature, mix
            Anchor settings (see ``init_anchors``).
        verbose
            Live progress display and stop messages.

        Returns
        -------
        The training history. Sets ``adata.obsm[key_added]``: float32
        ``(n_obs, latent_dim)`` anchored representations (eval mode). ``embed()``
        afterwards reflects the fine-tuned backbone.
        """
        epochs = _check_positive_int("epochs", epochs)
        lr = _check_rate("lr", lr)
        tune_lr = _check_rate("tune_lr", tune_lr)
        temperature = _check_rate("temperature", temperature)
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 <= mix <= 1:
            msg = f"mix must be a number in [0, 1], got {mix!r}."
            raise ValueError(msg)
        _check_key_added(key_added)
        trainer = self._require_trainer("refine()")
        if self.class_key is None or self.dataset.class_codes is None:
            msg = "refine() needs class labels; create the model with class_key=<obs column>."
            raise ValueError(msg)
        if self.model.anchors is None:
            mu = self._infer(self.dataset)
            codes = self.dataset.class_codes
            n_classes = self.dataset.n_classes
            means = np.stack([mu[codes == c].mean(0) if (codes == c).any()
                              else np.zeros(mu.shape[1], np.float32) for c in range(n_classes)])
            self.model.init_anchors(n_classes, temperature=temperature, mix=mix,
                                    init=torch.as_tensor(means, dtype=torch.float32))
        trainer.verbose = verbose
        self.dataset.set_mode(MODES.CLASS)
        try:
            loaders = make_loaders(self.dataset, batch_size, split_rate, obs_key=self.class_key,
                                   seed=self.seed + 1)
            trainer.init_optimizer(lr=lr, tune_lr=tune_lr, stage=2)
            trainer.train_batch(epochs, loaders)
        finally:
            self.dataset.set_mode(MODES.BATCH)
        self._final_checkpoint()
        self._write_obsm({key_added: self._infer(self.dataset, method="anchored")})
        return self.history

    # ------------------------------------------------------------- inference
    def embed(self, adata: ad.AnnData | None = None, *, anchored: bool = False,
              batch_size: int = 1024) -> np.ndarray:
        """Embed cells with the current model (eval mode, posterior means).

        Parameters
        ----------
        adata
            Cells to embed; ``None`` embeds the training data. Other data must contain
            every model gene (extra genes are ignored); batches must be ones the model
            knows (cells without the batch column are embedded as batch 0 — the encoder
            does not read batches, so the embedding is the same).
        anchored
            Return the anchored representation (after :meth:`refine`).
        batch_size
            Cells per inference batch.

        Returns
        -------
        float32 array ``(n_obs, latent_dim)``. Nothing is written into ``adata``.
        """
        dataset = self._dataset_for(adata)
        if anchored and self.model.anchors is None:
            msg = "anchored=True needs anchors; call refine() first."
            raise ValueError(msg)
        return self._infer(dataset, method="anchored" if anchored else "embed",
                           batch_size=batch_size)

    # ------------------------------------------------------------ save/load
    @classmethod
    def load(cls, dir: str | os.PathLike, adata: ad.AnnData, *,
             device: str | torch.device = "cpu") -> scModel:
        """Rebuild a model saved by :meth:`save` for ``adata``.

        Parameters
        ----------
        dir
            Folder written by :meth:`save`.
        adata
            Data with every gene the model was trained on (a ``ValueError`` lists the
            missing ones); only those genes are used, in the saved order.
        device
            Where to put the model.

        Returns
        -------
        An :class:`scModel` with the saved weights and history; ``embed()`` reproduces
        the saved model's embedding exactly.
        """
        config, state, history = cls._read_saved(dir)
        model = cls.__new__(cls)
        Workflow.__init__(model, adata, **cls._restore_kwargs(config), device=device)
        model._load_weights(state, history)
        return model
