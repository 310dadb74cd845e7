"""Spatial workflow: TranscriptFormer with a graph smoother over per-section neighbour
graphs, trained in two stages or end to end, then clustered into spatial domains."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch_geometric.loader import DataLoader as GraphLoader

from step._constants import ADATA_KEYS, MODES
from step.functionality.comps.trainer import Trainer, category_random_split, read_checkpoint
from step.graph import NeighborSampler, build_spatial_graph, section_graphs
from step.utils.dataset import BaseDataset, StDataset, index_loader
from step.utils.validation import check_adata, check_obs_key, check_obsm_key
from step.workflows._base import Workflow, _check_key_added, _check_positive_int, _check_rate
from step.workflows._cluster import cluster_labels, spatial_majority_vote

__all__ = ["stModel"]

MODES_OF_TRAINING = ("two-stage", "end-to-end")
GRAPH_METHODS = ("knn", "radius", "hex")

#: Optimizer steps that the default number of epochs aims at: stage 1 of the two-stage
#: mode, the end-to-end mode, and stage 2 (one step per batch of whole sections).
STAGE1_STEPS = 1500
END_TO_END_STEPS = 200
GRAPH_STEPS = 20
#: Bounds of the default number of epochs.
EPOCHS_MIN, EPOCHS_MAX = 10, 300
GRAPH_EPOCHS_MIN, GRAPH_EPOCHS_MAX = 2, 20


def default_epochs(steps_per_epoch: int, target_steps: int, *, lo: int = EPOCHS_MIN,
                   hi: int = EPOCHS_MAX) -> int:
    """Epochs that give about ``target_steps`` optimizer steps, within ``[lo, hi]``: small
    data get more epochs (each has few steps), large data fewer."""
    return int(np.clip(round(target_steps / max(int(steps_per_epoch), 1)), lo, hi))


def default_batch_size(n_train: int) -> int:
    """Spots per stage-1 mini-batch: about a twentieth of the training spots, as a power of
    two in ``[32, 128]`` (small sections still get many steps per epoch)."""
    return int(np.clip(2 ** round(np.log2(max(n_train, 1) / 20)), 32, 128))


class _Graph:
    """The spatial graph of one AnnData: global edges, section codes, section graphs."""

    def __init__(self, edge_index: torch.Tensor, sections: np.ndarray) -> None:
        self.edge_index = edge_index
        self.sections = sections
        self.num_nodes = int(len(sections))
        self.graphs = section_graphs(edge_index, sections)


#: The training loop(s) each mode runs, as a checkpoint records them.
_LOOPS_OF_MODE = {"two-stage": ("train_batch", "train_graph_batch"),
                  "end-to-end": ("train_node_sampler",)}


def _mode_of_checkpoint(state: Mapping[str, Any]) -> str | None:
    """The training mode recorded in a checkpoint (or implied by its loop)."""
    mode = (state.get("metadata") or {}).get("mode")
    if mode is not None:
        return str(mode)
    loop = str(state.get("counters", {}).get("loop_name", ""))
    return next((m for m, loops in _LOOPS_OF_MODE.items() if loop in loops), None)


def _check_coordinates(coords: np.ndarray, sections: np.ndarray, names: Sequence[str],
                       spatial_key: str) -> None:
    """Coordinates must be finite and, within a section of several spots, not all equal."""
    if coords.ndim != 2 or coords.shape[1] < 2:
        msg = (f"obsm[{spatial_key!r}] must hold at least two coordinate columns, got shape "
               f"{coords.shape}.")
        raise ValueError(msg)
    n_bad = int((~np.isfinite(coords[:, :2])).any(axis=1).sum())
    if n_bad:
        msg = f"obsm[{spatial_key!r}] holds NaN or infinite coordinates for {n_bad} spots."
        raise ValueError(msg)
    for code in np.unique(sections):
        part = coords[sections == code, :2]
        if len(part) > 1 and np.ptp(part, axis=0).max() == 0:
            msg = (f"all {len(part)} spots of section {names[int(code)]!r} have the same "
                   f"coordinates in obsm[{spatial_key!r}]; a spatial graph needs the spots' "
                   "positions.")
            raise ValueError(msg)


class stModel(Workflow):  # noqa: N801 - the name users know from STEP
    """Spatial domains from spatially resolved counts with TranscriptFormer and a GCN
    smoother.

    A neighbour graph is built per section from the coordinates (no edge joins two
    sections). Training either runs in two stages (expression only, then the smoother
    and a fine-tuned backbone over batches of whole section graphs) or end to end over
    sampled sub-graphs. The unsmoothed and the smoothed embeddings are written to the
    caller's AnnData, and :meth:`cluster` turns the smoothed one into domains.

    Parameters
    ----------
    adata
        Spots (or cells) x genes with raw integer counts and coordinates in
        ``obsm[spatial_key]``.
    layer
        Layer with the counts; ``None`` reads ``X``.
    section_key
        obs column naming each spot's section; ``None`` for one section.
    spatial_key
        obsm entry with the coordinates (first two columns).
    batch_key
        obs column with batches for the model's batch embedding (e.g. the section key,
        to correct section effects); ``None`` for none.
    k
        Neighbours per spot for ``graph_method="knn"``.
    graph_method
        ``"knn"``, ``"radius"`` (with ``radius``) or ``"hex"`` (Visium-style grids); see
        :func:`step.graph.build_spatial_graph`.
    radius
        Distance cut-off for ``graph_method="radius"``.
    n_top_genes
        Keep this many highly variable genes; ``None`` keeps all.
    hidden_dim, n_modules, module_dim, n_layers, likelihood
        Architecture of :class:`~step.models.TranscriptFormer`.
    kl_weight
        Weight of the KL term. 0.1 rather than the model's 1.0, as in
        :class:`~step.workflows.scModel`: on a real ST section (a few hundred spots,
        10 domains, ``n_top_genes=2000``) the two-stage ``X_smoothed`` reached a k-means
        domain ARI of 0.43 with a KL weight of 0.1 and longer training, against 0.11 with
        1.0 and the former 100 + 50 epochs (PCA of log-normalised counts: 0.36). With
        the full weight the posterior stays close to the prior and the domains, which
        differ only in cell-type proportions, are lost. On the four generated cases of
        ``benchmarks/spatial_quality.py`` (two seeds) the two-stage ``X_smoothed`` at
        these defaults averaged 0.41 against PCA's 0.20, its own ``X_rep``'s 0.19 and
        step-kit's 0.29, and was ahead of all three on every case (step-kit came
        closest on ``cortex_hex``, 0.32 against 0.35, and ``st_rounded``, 0.39 against
        0.44). The end-to-end ``X_smoothed`` averaged 0.28.
    smoother_layers
        GCN layers of the smoother (2; other values were not measured).
    node_limit
        Sections with more nodes than this are embedded block by block over exact
        (full fan-out) neighbourhoods instead of as one graph.
    seed
        Seeds initialisation, splits, sampling and training.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"`` (CUDA when available) or a
        :class:`torch.device`.
    **model_kw
        Other :class:`~step.models.TranscriptFormer` arguments.

    Examples
    --------
    >>> from step.datasets import spatial_sections_from_cells
    >>> from step.workflows import stModel
    >>> adata = spatial_sections_from_cells()
    >>> model = stModel(adata, section_key="section")
    >>> history = model.run()                 # obsm["X_rep"], obsm["X_smoothed"]
    >>> model.cluster(4)                      # obs["domain"]
    """

    workflow_name = "stModel"

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        section_key: str | None = None,
        spatial_key: str = "spatial",
        batch_key: str | None = None,
        k: int = 6,
        graph_method: str = "knn",
        radius: float | None = None,
        n_top_genes: int | None = None,
        hidden_dim: int = 64,
        n_modules: int = 32,
        module_dim: int = 30,
        n_layers: int = 2,
        likelihood: str = "zinb",
        kl_weight: float = 0.1,
        smoother_layers: int = 2,
        node_limit: int = 50_000,
        seed: int = 0,
        device: str | torch.device = "cpu",
        **model_kw: Any,
    ) -> None:
        self._set_spatial(adata, section_key=section_key, spatial_key=spatial_key, k=k,
                          graph_method=graph_method, radius=radius,
                          smoother_layers=smoother_layers, node_limit=node_limit)
        super().__init__(
            adata, layer=layer, batch_key=batch_key, class_key=None, n_top_genes=n_top_genes,
            hidden_dim=hidden_dim, n_modules=n_modules, module_dim=module_dim,
            n_layers=n_layers, likelihood=likelihood, seed=seed, device=device,
            model_kw={"kl_weight": kl_weight, **model_kw},
        )
        self.graph = self._graph_of(self._prepared)

    def _set_spatial(self, adata: ad.AnnData, *, section_key: str | None, spatial_key: str,
                     k: int, graph_method: str, radius: float | None, smoother_layers: int,
                     node_limit: int) -> None:
        check_adata(adata)
        check_obsm_key(adata, spatial_key, role="spatial_key")
        if section_key is not None:
            check_obs_key(adata, section_key, role="section_key")
        if graph_method not in GRAPH_METHODS:
            msg = f"graph_method must be one of {GRAPH_METHODS}, got {graph_method!r}."
            raise ValueError(msg)
        if graph_method == "radius":
            radius = _check_rate("radius", radius)
        elif radius is not None:
            msg = f"radius is only used with graph_method='radius', not {graph_method!r}."
            raise ValueError(msg)
        self.section_key = section_key
        self.spatial_key = spatial_key
        self.k = _check_positive_int("k", k)
        self.graph_method = graph_method
        self.radius = radius
        self.smoother_layers = _check_positive_int("smoother_layers", smoother_layers)
        self.node_limit = _check_positive_int("node_limit", node_limit)

    # ----------------------------------------------------------------- data
    def _make_dataset(self, prepared: ad.AnnData, *, with_class: bool = True) -> BaseDataset:
        batch_key = self.batch_key if self.batch_key in prepared.obs.columns else None
        return StDataset(prepared, batch_key=batch_key, spatial_key=self.spatial_key,
                         mode=MODES.BATCH)

    def _graph_of(self, prepared: ad.AnnData) -> _Graph:
        check_obsm_key(prepared, self.spatial_key, role="spatial_key")
        n = prepared.n_obs
        if self.section_key is None:
            sections, names = np.zeros(n, dtype=np.int64), ["(all spots)"]
        else:
            check_obs_key(prepared, self.section_key, role="section_key")
            column = prepared.obs[self.section_key]
            if column.isna().any():
                msg = f"section_key {self.section_key!r} has missing values; every spot needs one."
                raise ValueError(msg)
            codes, uniques = pd.factorize(column.astype(str), sort=True)
            sections, names = codes.astype(np.int64), [str(u) for u in uniques]
        coords = np.asarray(prepared.obsm[self.spatial_key], dtype=np.float64)
        _check_coordinates(coords, sections, names, self.spatial_key)
        edge_index = build_spatial_graph(coords[:, :2], sections, method=self.graph_method,
                                         k=self.k, radius=self.radius)
        if not bool((edge_index[0] != edge_index[1]).any()):
            msg = (f"the {self.graph_method} graph (radius={self.radius!r}) links no spot to "
                   "another one, so the smoother would see each spot alone; use a larger "
                   "radius or graph_method='knn'.")
            raise ValueError(msg)
        return _Graph(edge_index, sections)

    # -------------------------------------------------------------- training
    def run(
        self,
        *,
        mode: str = "two-stage",
        epochs: int | None = None,
        graph_epochs: int | None = None,
        batch_size: int | None = None,
        graph_batch_size: int = 1,
        lr: float = 1e-3,
        tune_lr: float = 1e-4,
        split_rate: float = 0.1,
        num_neighbors: Sequence[int] | None = None,
        sampler_batch_size: int = 256,
        max_steps: int | None = None,
        valid_every: int | None = None,
        key_added: str = ADATA_KEYS.X_REP,
        smoothed_key: str = ADATA_KEYS.X_SMOOTHED,
        probe: Mapping[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        verbose: bool = True,
        **trainer_kw: Any,
    ) -> pd.DataFrame:
        """Train and write the unsmoothed and smoothed embeddings.

        ``mode="two-stage"``: stage 1 trains on expression alone with mini-batches
        (``train_batch``, ``epochs``, all parameters at ``lr``); then a GCN smoother is
        attached, the optimizer is rebuilt for stage 2 (smoother at ``lr``, backbone at
        ``tune_lr``) and ``train_graph_batch`` runs ``graph_epochs`` epochs over batches of
        ``graph_batch_size`` whole section graphs, with the loss on training nodes and
        validation on the held-out nodes. ``mode="end-to-end"``: the smoother is attached
        from the start and ``train_node_sampler`` trains everything at ``lr`` for
        ``epochs`` epochs over sampled neighbourhoods of ``sampler_batch_size`` training
        seeds (sections drawn ``graph_batch_size`` at a time), validating on
        neighbourhoods of held-out seeds.

        Parameters
        ----------
        mode
            ``"two-stage"`` or ``"end-to-end"``.
        epochs
            Stage-1 epochs (two-stage) or node-sampler epochs (end-to-end). ``None``
            scales them with the data so that training takes about
            ``STAGE1_STEPS`` = 1,500 optimizer steps (two-stage) or
            ``END_TO_END_STEPS`` = 200 (end-to-end), within 10-300 epochs
            (``default_epochs``): a section of a few hundred spots gets about 80
            stage-1 epochs, 100,000 spots get 10. With 100 epochs of 128 spots, sections of
            a few hundred spots had only ~500 steps and their domains were poor.

            These stage-1 steps are where a two-stage run spends its time: profiled on
            ``st_rounded`` of ``benchmarks/spatial_quality.py`` (528 spots, one thread),
            about 80% went to the 1,500 stage-1 steps (forward and backward of the
            transformer over 32 spots), 7% to the per-epoch validation and 11% to the 20
            stage-2 steps over the whole section. Less work costs domain quality there
            (``X_smoothed`` k-means ARI, first seed): 0.44 at the defaults, 0.17 with 300
            steps, 0.15 with 400 steps of 128 spots, 0.28 with 800 steps of 64, 0.31 with
            1,500 steps of 16, and 0.01 with ``lr=3e-3`` (which also drives the smoother
            in stage 2). The end-to-end mode encodes the sampled neighbourhood of every
            seed at each step (on a small section nearly the whole section), so its 200
            steps cost about as much as two-stage training while the backbone gets about
            a seventh of the updates; its embeddings are weaker on the benchmark, which
            is why ``"two-stage"`` is the default mode.
        graph_epochs
            Stage-2 epochs (two-stage only); ``None``: about ``GRAPH_STEPS`` = 20 steps
            (one per batch of ``graph_batch_size`` sections), 2-20 epochs.
        batch_size
            Spots per stage-1 mini-batch; ``None``: ``default_batch_size`` (32 for a
            few hundred spots, up to 128 from about 2,000 training spots).
        graph_batch_size
            Sections per step of the graph loops.
        lr, tune_lr
            Learning rates of new parts and of the fine-tuned backbone.
        split_rate
            Fraction of spots of every section held out for validation.
        num_neighbors
            Fan-out per hop of the end-to-end sampler (default 10 per smoother layer).
        sampler_batch_size
            Seed nodes per end-to-end step.
        max_steps
            Steps per end-to-end epoch (default: one pass over the training seeds).
        valid_every
            Also validate every this many end-to-end steps (kept in
            ``trainer.step_history``).
        key_added, smoothed_key
            obsm keys of the unsmoothed and smoothed embeddings.
        probe, checkpoint_dir, resume, verbose, **trainer_kw
            As in :meth:`step.workflows.scModel.run`, ``precision="auto"`` included: on
            the four cases of ``benchmarks/spatial_quality.py``, three seeds, two-stage
            training in bf16 gave the domain ARI of fp32 (``X_smoothed``, mean over the
            cases: 0.385 in both). A checkpoint taken in stage 2 resumes stage 2.

        Returns
        -------
        The training history. Sets ``adata.obsm[key_added]`` (posterior means of the
        unsmoothed representation) and ``adata.obsm[smoothed_key]`` (of the smoothed
        one), float32 ``(n_obs, latent_dim)``, both in eval mode.
        """
        if mode not in MODES_OF_TRAINING:
            msg = f"mode must be one of {MODES_OF_TRAINING}, got {mode!r}."
            raise ValueError(msg)
        graph_batch_size = _check_positive_int("graph_batch_size", graph_batch_size)
        lr = _check_rate("lr", lr)
        tune_lr = _check_rate("tune_lr", tune_lr)
        for key in (key_added, smoothed_key):
            _check_key_added(key)
        if key_added == smoothed_key:
            msg = f"key_added and smoothed_key must differ, both are {key_added!r}."
            raise ValueError(msg)
        resume_stage = 0 if resume is None else self._check_resume_mode(resume, mode)
        trainer = self._make_trainer(checkpoint_dir=checkpoint_dir, probe=probe,
                                     verbose=verbose, trainer_kw=trainer_kw,
                                     metadata={**self._metadata(), "mode": mode})
        self.dataset.set_mode(MODES.BATCH)
        train_view, valid_view = self._split(split_rate)
        n_train = len(train_view)
        if batch_size is None:
            batch_size = default_batch_size(n_train)
        batch_size = _check_positive_int("batch_size", batch_size)
        if epochs is None:
            per_epoch = (-(-n_train // batch_size) if mode == "two-stage"
                         else -(-n_train // sampler_batch_size))
            epochs = (default_epochs(per_epoch, STAGE1_STEPS) if mode == "two-stage"
                      else default_epochs(per_epoch, END_TO_END_STEPS))
        epochs = _check_positive_int("epochs", epochs)
        if graph_epochs is None:
            per_epoch = -(-len(self.graph.graphs) // graph_batch_size)
            graph_epochs = default_epochs(per_epoch, GRAPH_STEPS, lo=GRAPH_EPOCHS_MIN,
                                          hi=GRAPH_EPOCHS_MAX)
        graph_epochs = _check_positive_int("graph_epochs", graph_epochs)
        train_ind = np.array(train_view.indices)
        valid_ind = np.array(valid_view.indices) if len(valid_view) else None

        if mode == "two-stage":
            if resume_stage != 2:
                trainer.init_optimizer(lr=lr, stage=1)
                if resume is not None:
                    trainer.load_checkpoint(resume)
                loaders = (
                    index_loader(train_view, batch_size, shuffle=True, seed=self.seed),
                    index_loader(valid_view, batch_size, shuffle=False) if len(valid_view)
                    else None,
                )
                trainer.train_batch(epochs, loaders)
            self._attach_smoother()
            trainer.init_optimizer(lr=lr, tune_lr=tune_lr, stage=2)
            if resume_stage == 2:
                trainer.load_checkpoint(resume)
            gloader = GraphLoader(self.graph.graphs, batch_size=graph_batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(self.seed))
            trainer.train_graph_batch(graph_epochs, gloader, self.dataset, train_ind, valid_ind)
        else:
            self._attach_smoother()
            trainer.init_optimizer(lr=lr, stage=1)
            if resume is not None:
                trainer.load_checkpoint(resume)
            self._train_end_to_end(trainer, epochs, train_ind, valid_ind,
                                   num_neighbors=num_neighbors, graph_batch_size=graph_batch_size,
                                   sampler_batch_size=sampler_batch_size, max_steps=max_steps,
                                   valid_every=valid_every)
        self._final_checkpoint()

        self._write_obsm({key_added: self._infer(self.dataset),
                          smoothed_key: self._infer_graph(self.dataset, self.graph)})
        return self.history

    def _metadata(self) -> dict[str, Any]:
        return {**super()._metadata(), "section_key": self.section_key,
                "spatial_key": self.spatial_key, "graph_method": self.graph_method,
                "k": self.k, "radius": self.radius, "smoother_layers": self.smoother_layers}

    def check_resume(self, resume: str | os.PathLike, *, mode: str = "two-stage") -> None:
        """Check that a checkpoint can be resumed by :meth:`run` with ``mode``.

        :meth:`run` makes the same check. A checkpoint of the same genes in another order
        is accepted and the prepared copy of the data is put in the checkpoint's gene
        order (the caller's AnnData is not changed).

        Parameters
        ----------
        resume
            A checkpoint written by :meth:`run`.
        mode
            The mode of the run that is to resume it.

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        ValueError
            If the file is not a readable checkpoint, was written in another mode, or
            records other genes or settings (layer, batch key and categories, section and
            spatial keys, graph settings, smoother layers); the message lists every
            difference.
        """
        self._check_resume_mode(resume, mode)

    def _check_resume_mode(self, resume: str | os.PathLike, mode: str) -> int:
        """Check a checkpoint to resume (mode first) and return the stage it was written in."""
        if mode not in MODES_OF_TRAINING:
            msg = f"mode must be one of {MODES_OF_TRAINING}, got {mode!r}."
            raise ValueError(msg)
        state = read_checkpoint(resume)
        written = _mode_of_checkpoint(state)
        if written is not None and written != mode:
            counters = state.get("counters", {})
            msg = (f"checkpoint {os.fspath(resume)!r} was written by a {written!r} run (stage "
                   f"{counters.get('stage')}); it cannot be resumed with mode={mode!r}. "
                   f"Resume it with mode={written!r}.")
            raise ValueError(msg)
        state = self._check_resume(resume, {"mode": mode})
        return int(state["counters"].get("stage", 1))

    def _split(self, split_rate: float) -> tuple[BaseDataset, BaseDataset]:
        key = self.section_key if self.section_key in self._prepared.obs.columns else None
        return category_random_split(self.dataset, split_rate, key, seed=self.seed)

    def _attach_smoother(self) -> None:
        if self.model.smoother is None:
            self.model.init_smoother_with_builtin(n_layers=self.smoother_layers)

    def _train_end_to_end(self, trainer: Trainer, epochs: int, train_ind: np.ndarray,
                          valid_ind: np.ndarray | None, *, num_neighbors: Sequence[int] | None,
                          graph_batch_size: int, sampler_batch_size: int,
                          max_steps: int | None, valid_every: int | None) -> None:
        fan_out = tuple(num_neighbors) if num_neighbors is not None else (
            (10,) * self.smoother_layers)
        common = dict(num_neighbors=fan_out, batch_size=sampler_batch_size,
                      sections=self.graph.sections, graph_batch_size=graph_batch_size)
        sampler = NeighborSampler(self.graph.edge_index, self.graph.num_nodes, shuffle=True,
                                  seed=self.seed, input_nodes=train_ind, **common)
        valid_loader = None
        if valid_ind is not None:
            valid_loader = NeighborSampler(self.graph.edge_index, self.graph.num_nodes,
                                           shuffle=False, seed=self.seed + 1,
                                           input_nodes=valid_ind, **common)
        trainer.train_node_sampler(epochs, sampler, self.dataset, train_ind, valid_ind,
                                   valid_loader=valid_loader, valid_every=valid_every,
                                   max_steps=max_steps, end_to_end=True)

    # ------------------------------------------------------------- inference
    def _infer_graph(self, dataset: BaseDataset, graph: _Graph, *,
                     block_size: int = 1024) -> np.ndarray:
        """Smoothed posterior means of every node, section by section (eval mode).

        A section with at most :attr:`node_limit` nodes is embedded as one graph. A larger
        one is embedded in blocks of ``block_size`` seed nodes, each with its complete
        neighbourhood of ``smoother_layers + 1`` hops (every neighbour, so the GCN sees
        the same neighbours and degrees as on the whole graph).
        """
        if self.model.smoother is None:
            msg = "the model has no smoother yet; call run() first."
            raise RuntimeError(msg)
        out = np.zeros((len(dataset), self.model.latent_dim), dtype=np.float32)
        big = [g for g in graph.graphs if g.num_nodes > self.node_limit]
        sampler = None
        if big:
            n_hops = int(self.model.config["smoother"]["n_layers"]) + 1
            sampler = NeighborSampler(graph.edge_index, graph.num_nodes,
                                      num_neighbors=(-1,) * n_hops, batch_size=block_size,
                                      shuffle=False, seed=0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for g in graph.graphs:
                    if g.num_nodes <= self.node_limit:
                        out[g.node_index.numpy()] = self._embed_graph(
                            dataset, g.node_index, g.edge_index)
                        continue
                    for block in torch.split(g.node_index, block_size):
                        sub = sampler.sample(block)
                        emb = self._embed_graph(dataset, sub.node_index, sub.edge_index)
                        out[block.numpy()] = emb[: sub.n_seed]
        finally:
            self.model.train(was_training)
        return out

    def _embed_graph(self, dataset: BaseDataset, node_index: torch.Tensor,
                     edge_index: torch.Tensor) -> np.ndarray:
        inputs = {k: v.to(self.device) for k, v in dataset[node_index].items()}
        emb = self.model.embed_graph(inputs, edge_index.to(self.device), smoothed=True)
        return emb.float().cpu().numpy()

    def embed(self, adata: ad.AnnData | None = None, *, smoothed: bool = True,
              batch_size: int = 1024) -> np.ndarray:
        """Embed spots with the current model (eval mode, posterior means).

        Parameters
        ----------
        adata
            Spots to embed; ``None`` embeds the training data. Other data need every model
            gene, coordinates under ``spatial_key`` and (if the model used one) the
            section column; their graph is built with the model's graph settings.
        smoothed
            Smooth over the spatial graph (as ``X_smoothed``) or not (as ``X_rep``).
        batch_size
            Spots per inference batch (unsmoothed) or per block (large sections).

        Returns
        -------
        float32 array ``(n_obs, latent_dim)``. Nothing is written into ``adata``.
        """
        if adata is None or adata is self.adata:
            dataset, graph = self.dataset, self.graph
        else:
            prepared = self._prepare_other(adata)
            dataset = self._make_dataset(prepared, with_class=False)
            graph = self._graph_of(prepared) if smoothed else None
        if not smoothed:
            return self._infer(dataset, batch_size=batch_size)
        return self._infer_graph(dataset, graph, block_size=batch_size)

    def cluster(
        self,
        n_clusters: int,
        *,
        method: str = "kmeans",
        use_rep: str = ADATA_KEYS.X_SMOOTHED,
        key_added: str = ADATA_KEYS.DOMAIN,
        seed: int | None = None,
        refine: bool = False,
    ) -> None:
        """Cluster an embedding into spatial domains.

        Parameters
        ----------
        n_clusters
            Number of domains (Leiden: the resolution whose count is closest).
        method
            ``"kmeans"`` or ``"leiden"``.
        use_rep
            obsm key of the embedding to cluster (written by :meth:`run`).
        key_added
            obs column for the domains.
        seed
            Clustering seed (default: the model's seed).
        refine
            Smooth the labels over the model's spatial graph: one majority-vote pass
            (``spatial_majority_vote``) gives a spot the
            label carried by more than half of its spatial neighbours, which fixes
            isolated mislabels inside a domain and keeps borders and thin layers. Off
            by default: on the two-stage ``X_smoothed`` of
            ``benchmarks/spatial_quality.py`` (two seeds) it changed the mean domain ARI
            over the cases by +0.005 (-0.005 to +0.017 per case, within the seed-to-seed
            spread; labels of ``X_smoothed`` are already spatially coherent); on
            unsmoothed embeddings it helps more.

        Returns
        -------
        None. Sets ``adata.obs[key_added]``: categorical domain labels (``"0"``, ``"1"``,
        ...).
        """
        if not isinstance(key_added, str) or not key_added:
            msg = f"key_added must be a non-empty string, got {key_added!r}."
            raise TypeError(msg)
        rep = self._require_obsm(use_rep)
        labels = cluster_labels(rep, n_clusters, method=method,
                                seed=self.seed if seed is None else seed)
        if refine:
            labels = spatial_majority_vote(labels, self.graph.edge_index)
            labels = np.unique(labels, return_inverse=True)[1]
        names = [str(c) for c in range(int(labels.max()) + 1)]
        self.adata.obs[key_added] = pd.Categorical(labels.astype(str), categories=names)

    # ------------------------------------------------------------ save/load
    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "section_key": self.section_key,
                "spatial_key": self.spatial_key, "k": self.k, "graph_method": self.graph_method,
                "radius": self.radius, "smoother_layers": self.smoother_layers,
                "node_limit": self.node_limit}

    @classmethod
    def load(cls, dir: str | os.PathLike, adata: ad.AnnData, *,
             device: str | torch.device = "cpu") -> stModel:
        """Rebuild a model saved by :meth:`save` for ``adata``.

        Parameters
        ----------
        dir
            Folder written by :meth:`save`.
        adata
            Data with every model gene (a ``ValueError`` lists missing ones), the
            coordinates and the section column the model was built with.
        device
            Where to put the model.

        Returns
        -------
        An :class:`stModel` with the saved weights (smoother included) and history; its
        graph is rebuilt from ``adata`` with the saved settings.
        """
        config, state, history = cls._read_saved(dir)
        settings = config["settings"]
        model = cls.__new__(cls)
        model._set_spatial(adata, section_key=settings["section_key"],
                           spatial_key=settings["spatial_key"], k=settings["k"],
                           graph_method=settings["graph_method"], radius=settings["radius"],
                           smoother_layers=settings["smoother_layers"],
                           node_limit=settings["node_limit"])
        Workflow.__init__(model, adata, **cls._restore_kwargs(config), device=device)
        model.graph = model._graph_of(model._prepared)
        model._load_weights(state, history)
        return model

