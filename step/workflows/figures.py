"""Figures of a finished run: loss curves per term, and UMAP / spatial maps of embeddings.

Drawn with matplotlib's non-interactive Agg canvas, so they work without a display, and
written atomically as PNG files.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from step.utils.files import write_atomic
from step.utils.threads import keep_torch_threads
from step.workflows._cluster import neighbor_graph

__all__ = ["plot_loss_curves", "plot_spatial", "plot_umap", "umap_coordinates"]


def _figure(n_panels: int, *, width: float = 4.2, height: float = 3.6, max_cols: int = 3):
    from matplotlib.figure import Figure

    n_cols = min(max_cols, max(1, n_panels))
    n_rows = int(np.ceil(max(1, n_panels) / n_cols))
    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    axes = [fig.add_subplot(n_rows, n_cols, i + 1) for i in range(max(1, n_panels))]
    return fig, axes


def _save_png(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    return write_atomic(path, lambda handle: handle.write(data))


def _loss_terms(history: pd.DataFrame) -> list[str]:
    return [c for c in history.columns
            if c.endswith("_loss") and not c.startswith("val_")]


def plot_loss_curves(history: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One panel per loss term with its training and validation curves.

    Parameters
    ----------
    history
        A workflow's or Trainer's history (columns ``<term>`` and ``val_<term>``, plus
        ``epoch`` and ``loop``).
    path
        PNG file to write.

    Returns
    -------
    The written path. Dotted vertical lines mark where a new training loop (stage)
    starts.
    """
    if history is None or history.empty:
        msg = "the history is empty: nothing was trained, so there are no loss curves."
        raise ValueError(msg)
    terms = _loss_terms(history)
    if not terms:
        msg = f"the history holds no loss columns; columns: {list(history.columns)}."
        raise ValueError(msg)
    epochs = history["epoch"].to_numpy() if "epoch" in history else np.arange(len(history))
    starts = []
    if "loop" in history:
        loops = history["loop"].astype(str).to_numpy()
        starts = [epochs[i] for i in range(1, len(loops)) if loops[i] != loops[i - 1]]
    fig, axes = _figure(len(terms))
    for ax, term in zip(axes, terms, strict=True):
        train = pd.to_numeric(history[term], errors="coerce").to_numpy()
        ax.plot(epochs, train, label="train", color="tab:blue")
        val_key = f"val_{term}"
        if val_key in history:
            val = pd.to_numeric(history[val_key], errors="coerce").to_numpy()
            ax.plot(epochs, val, label="validation", color="tab:orange")
        for start in starts:
            ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(term)
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize="small")
    return _save_png(fig, path)


def umap_coordinates(rep: np.ndarray, *, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Two-dimensional UMAP of an embedding (scanpy ``neighbors`` + ``umap``)."""
    import scanpy as sc

    graph = neighbor_graph(np.asarray(rep, dtype=np.float32), n_neighbors=n_neighbors,
                           seed=seed)
    with warnings.catch_warnings(), keep_torch_threads():
        warnings.simplefilter("ignore")
        sc.tl.umap(graph, random_state=seed)
    return np.asarray(graph.obsm["X_umap"])


def _scatter_by(ax, xy: np.ndarray, values: pd.Series, title: str, *, size: float) -> None:
    cat = pd.Categorical(values.astype(str))
    cmap_name = "tab10" if len(cat.categories) <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[cmap_name]
    for i, name in enumerate(cat.categories):
        mask = cat.codes == i
        ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=cmap(i % cmap.N), label=name,
                   linewidths=0, rasterized=True)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(cat.categories) <= 20:
        ax.legend(frameon=False, fontsize="x-small", markerscale=3, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))


def plot_umap(
    adata: ad.AnnData,
    path: str | os.PathLike,
    *,
    use_rep: str = "X_rep",
    color: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """UMAP of ``adata.obsm[use_rep]`` with one panel per obs column in ``color``.

    The UMAP is computed on a scratch object; ``adata`` is not modified.

    Parameters
    ----------
    adata
        Data with the embedding.
    path
        PNG file to write.
    use_rep
        obsm key of the embedding.
    color
        obs columns to colour by (labels, batches, domains); one uncoloured panel when
        empty.
    seed
        Seed of the neighbour graph and UMAP.

    Returns
    -------
    The written path.
    """
    if use_rep not in adata.obsm:
        msg = f"use_rep {use_rep!r} not found in adata.obsm; available: {list(adata.obsm)}."
        raise KeyError(msg)
    missing = [c for c in color if c not in adata.obs.columns]
    if missing:
        msg = f"color columns {missing} not found in adata.obs; available: {list(adata.obs)}."
        raise KeyError(msg)
    xy = umap_coordinates(np.asarray(adata.obsm[use_rep]), seed=seed)
    keys = list(color) or [None]
    fig, axes = _figure(len(keys), width=6.8, height=4.4, max_cols=2)
    size = float(np.clip(3000 / max(1, adata.n_obs), 0.5, 20))
    for ax, key in zip(axes, keys, strict=True):
        if key is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, color="tab:blue", linewidths=0)
            ax.set_title(f"UMAP of {use_rep}")
        else:
            _scatter_by(ax, xy, adata.obs[key], f"UMAP of {use_rep}: {key}", size=size)
    return _save_png(fig, path)


def plot_spatial(
    adata: ad.AnnData,
    path: str | os.PathLike,
    *,
    color: str = "domain",
    spatial_key: str = "spatial",
    section_key: str | None = None,
) -> Path:
    """Spots at their coordinates coloured by ``adata.obs[color]``, one panel per section.

    Returns
    -------
    The written path.
    """
    for key, where, role in ((color, adata.obs.columns, "color"),
                             (spatial_key, adata.obsm.keys(), "spatial_key")):
        if key not in where:
            msg = f"{role} {key!r} not found; available: {list(where)}."
            raise KeyError(msg)
    coords = np.asarray(adata.obsm[spatial_key])[:, :2]
    if section_key is None:
        groups = {"all spots": np.arange(adata.n_obs)}
    else:
        sections = adata.obs[section_key].astype(str).to_numpy()
        groups = {s: np.flatnonzero(sections == s) for s in sorted(set(sections))}
    values = pd.Series(pd.Categorical(adata.obs[color].astype(str)))
    fig, axes = _figure(len(groups), width=4.6, height=4.0)
    for ax, (name, rows) in zip(axes, groups.items(), strict=True):
        cat = values.iloc[rows]
        cat = pd.Series(pd.Categorical(cat.astype(str), categories=values.cat.categories))
        _scatter_by(ax, coords[rows], cat, f"{color}: {name}",
                    size=float(np.clip(4000 / max(1, len(rows)), 1, 30)))
        ax.set_aspect("equal")
    return _save_png(fig, path)
