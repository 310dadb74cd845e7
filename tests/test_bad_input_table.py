"""Bad input, one row per case: the workflows' API, the ``step`` command line, checkpoint
and saved-model files, and spatial input.

Every row states the error (an exception type, or exit status 2 with one
``step: error: ...`` line for the command line) and a fragment of its message; the
harness also checks that the input AnnData (obs, var, X, obsm, uns, layers) and every
file of the test (inputs, checkpoints, output folders) are unchanged. Almost every row
fails before training.

``docs/guide/bad_input.rst`` is generated from :data:`ROWS`; regenerate it with
``python tests/test_bad_input_table.py > docs/guide/bad_input.rst``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "guide" / "bad_input.rst"
SMALL = {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "n_layers": 1, "latent_dim": 8,
         "dropout": 0.0}
N_CELLS, N_GENES = 200, 300
pytestmark = [
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),  # crafted file
    pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning"),
]


@dataclasses.dataclass(frozen=True)
class Row:
    """One bad input: ``call(env, adata, tmp)`` must fail with ``error`` and a message
    containing ``match`` (plain text)."""

    id: str
    problem: str
    call: Callable[[Any, ad.AnnData, Path], Any]
    error: type[BaseException] | int
    match: str
    data: str = "sc"  # which AnnData the call receives: "sc" or "st"
    make: Callable[[ad.AnnData], ad.AnnData] | None = None  # turns it into the bad input
    setup: Callable[[Any, Path], None] | None = None  # prepares files in tmp


# ------------------------------------------------------------------------ helpers
def _sc(adata, **kw):
    from step.workflows import scModel

    return scModel(adata, **{**SMALL, **kw})


def _st(adata, **kw):
    from step.workflows import stModel

    return stModel(adata, **{"section_key": "section", **SMALL, **kw})


def _run(adata, *, model_kw=None, **kw):
    return _sc(adata, **(model_kw or {})).run(epochs=1, verbose=False, **kw)


def _st_run(adata, *, model_kw=None, **kw):
    return _st(adata, **(model_kw or {})).run(epochs=1, graph_epochs=1, verbose=False, **kw)


def _set(attr: str, value: Any) -> Callable[[ad.AnnData], ad.AnnData]:
    def make(adata: ad.AnnData) -> ad.AnnData:
        setattr(adata, attr, value(adata) if callable(value) else value)
        return adata

    return make


def _with_x(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[ad.AnnData], ad.AnnData]:
    def make(adata: ad.AnnData) -> ad.AnnData:
        adata.X = sp.csr_matrix(fn(adata.X.toarray()))
        return adata

    return make


def _dup_genes(adata: ad.AnnData) -> ad.AnnData:
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    return adata


def _no_x(adata: ad.AnnData) -> ad.AnnData:
    adata.layers["counts"] = adata.X
    adata.X = None
    return adata


def _coords(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[ad.AnnData], ad.AnnData]:
    def make(adata: ad.AnnData) -> ad.AnnData:
        adata.obsm["spatial"] = fn(np.asarray(adata.obsm["spatial"], dtype=np.float64).copy())
        return adata

    return make


def _obs(column: str, fn: Callable[[ad.AnnData], Any]) -> Callable[[ad.AnnData], ad.AnnData]:
    def make(adata: ad.AnnData) -> ad.AnnData:
        adata.obs[column] = fn(adata)
        return adata

    return make


def _cli(*argv: str) -> Callable[[Any, ad.AnnData, Path], int]:
    """A command line; ``{name}`` in an argument is replaced by ``env.paths[name]``,
    ``{tmp}`` by the row's folder."""

    def call(env: Any, adata: ad.AnnData, tmp: Path) -> int:
        from step import cli

        args = [a.format(tmp=tmp, **env.paths) for a in argv]
        try:
            return cli.main(args)
        except SystemExit as stop:
            return int(stop.code)

    return call


def _fit(*argv: str) -> Callable[[Any, ad.AnnData, Path], int]:
    return _cli("fit", "{small}", "--out", "{tmp}/out", "--quiet", *argv)


def _write(relative: str, content: bytes = b"x") -> Callable[[Any, Path], None]:
    def setup(env: Any, tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    return setup


def _previous_run(env: Any, tmp: Path) -> None:
    for name in ("result.h5ad", "run/model.pt", "figures/spatial_domains.png"):
        _write(f"out/{name}")(env, tmp)


def _no_cuda(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        return fn(*args)

    return call


# ------------------------------------------------------------------------ the rows
ROWS: list[Row] = [
    # ---- scModel: the data
    Row("api-not-anndata", "scModel gets a dict instead of an AnnData or paths",
        lambda e, a, t: _sc({"X": a.X}), TypeError, "expected an AnnData object"),
    Row("api-path-missing", "scModel gets the path of a file that does not exist",
        lambda e, a, t: _sc(str(t / "data.h5ad")), FileNotFoundError,
        "data.h5ad': no such file or directory"),
    Row("api-no-cells", "no cells", lambda e, a, t: _sc(a[:0].copy()), ValueError,
        "0 cell(s)"),
    Row("api-one-cell", "a single cell", lambda e, a, t: _sc(a[:1].copy()), ValueError,
        "needs at least 2"),
    Row("api-no-genes", "no genes", lambda e, a, t: _sc(a[:, :0].copy()), ValueError,
        "empty"),
    Row("api-missing-layer", "layer= names no layer", lambda e, a, t: _sc(a, layer="counts"),
        KeyError, "layer 'counts' not found"),
    Row("api-x-none", "X is None and no layer given", lambda e, a, t: _sc(a), ValueError,
        "adata.X is None", make=_set("X", None)),
    Row("api-lognormalised", "log-normalised values instead of counts",
        lambda e, a, t: _sc(a), ValueError, "non-integer", make=_with_x(np.log1p)),
    Row("api-negative", "negative counts", lambda e, a, t: _sc(a), ValueError, "negative",
        make=_with_x(lambda x: x - 1)),
    Row("api-nan", "NaN counts", lambda e, a, t: _sc(a), ValueError, "NaN or infinite",
        make=_with_x(lambda x: np.where(x > 2, np.nan, x))),
    Row("api-duplicate-genes", "duplicated gene names", lambda e, a, t: _sc(a), ValueError,
        "var_names_make_unique", make=_dup_genes),
    Row("api-backed-top-genes", "n_top_genes=0 with a backed AnnData (read_h5ad(backed='r'))",
        lambda e, a, t: _sc(ad.read_h5ad(e.paths["small"], backed="r"), n_top_genes=0),
        ValueError, "n_top_genes must be a positive integer"),
    Row("api-genes-missing", "genes= names a gene the data lack",
        lambda e, a, t: _sc(a, genes=["NOT_A_GENE", a.var_names[0]]), ValueError,
        "the data lack 1 of the 2 genes"),
    # ---- scModel: data on disk
    Row("disk-genes-unmatched", "files whose genes cannot be matched by name",
        lambda e, a, t: _sc([e.paths["small"], e.paths["fewer_genes"]]), ValueError,
        "fewer_genes.h5ad' lacks 50 genes"),
    Row("disk-cells-repeat", "files with the same cell names",
        lambda e, a, t: _sc([e.paths["small"], e.paths["small_zarr"]]), ValueError,
        "cell names (obs_names) repeat within or across the files"),
    Row("disk-dense", "a file whose counts are a dense matrix",
        lambda e, a, t: _sc(e.paths["dense"]), ValueError,
        "reading from disk needs a CSR sparse matrix"),
    Row("disk-no-x", "a store without X (counts in a layer not named)",
        lambda e, a, t: _sc(e.paths["no_x"]), ValueError, "has no counts in X; pass layer="),
    Row("disk-not-counts", "a file holding log-normalised values",
        lambda e, a, t: _sc(e.paths["lognorm"]), ValueError, "non-integer"),
    Row("disk-changed-while-training", "a file truncated while training reads it",
        lambda e, a, t: _truncated_while_training(e), OSError,
        "was changed (truncated, replaced or rewritten) while in use"),
    Row("api-batch-key", "batch_key names no obs column",
        lambda e, a, t: _sc(a, batch_key="sample"), KeyError, "batch_key 'sample' not found"),
    Row("api-class-key", "class_key names no obs column",
        lambda e, a, t: _sc(a, class_key="cell_type"), KeyError,
        "class_key 'cell_type' not found"),
    Row("api-batch-missing", "a batch label is missing",
        lambda e, a, t: _sc(a, batch_key="batch"), ValueError, "missing",
        make=_obs("batch", lambda a: pd.Series(["b0", None] * (a.n_obs // 2),
                                               index=a.obs_names))),
    Row("api-seed-negative", "seed=-1", lambda e, a, t: _sc(a, seed=-1), ValueError,
        "seed must be an integer in [0, 2**32)"),
    Row("api-seed-float", "seed=1.5", lambda e, a, t: _sc(a, seed=1.5), TypeError,
        "seed must be an integer"),
    Row("api-device", "an unknown device", lambda e, a, t: _sc(a, device="gpu0"), ValueError,
        "device must be"),
    Row("api-cuda", "device='cuda' without a GPU",
        _no_cuda(lambda e, a, t: _sc(a, device="cuda")), ValueError, "CUDA is not available"),
    Row("api-n-top-genes", "n_top_genes=0", lambda e, a, t: _sc(a, n_top_genes=0), ValueError,
        "n_top_genes"),
    Row("api-likelihood", "an unknown likelihood", lambda e, a, t: _sc(a, likelihood="gauss"),
        ValueError, "likelihood must be one of"),
    # ---- scModel.run, refine, embed
    Row("run-lr-inf", "lr=inf", lambda e, a, t: _run(a, lr=float("inf")), ValueError,
        "lr must be a positive finite number, got inf"),
    Row("run-lr-nan", "lr=nan", lambda e, a, t: _run(a, lr=float("nan")), ValueError,
        "lr must be a positive finite number, got nan"),
    Row("run-lr-zero", "lr=0", lambda e, a, t: _run(a, lr=0), ValueError,
        "lr must be a positive finite number, got 0"),
    Row("run-lr-negative", "lr=-1e-3", lambda e, a, t: _run(a, lr=-1e-3), ValueError,
        "got -0.001"),
    Row("run-lr-string", "lr given as a string", lambda e, a, t: _run(a, lr="1e-3"),
        TypeError, "lr must be a positive finite number"),
    Row("run-epochs-zero", "epochs=0", lambda e, a, t: _sc(a).run(epochs=0, verbose=False),
        ValueError, "epochs must be a positive integer"),
    Row("run-batch-size-zero", "batch_size=0", lambda e, a, t: _run(a, batch_size=0),
        ValueError, "batch_size"),
    Row("run-split-rate", "split_rate=1", lambda e, a, t: _run(a, split_rate=1.0), ValueError,
        "[0, 1)"),
    Row("run-key-added", "key_added=''", lambda e, a, t: _run(a, key_added=""), TypeError,
        "key_added must be a non-empty string"),
    Row("run-probe", "probe is not a dict", lambda e, a, t: _run(a, probe=5), TypeError,
        "probe must be None or a dict"),
    Row("refine-before-run", "refine() before run()", lambda e, a, t: _sc(a).refine(),
        RuntimeError, "call run() first"),
    Row("refine-tune-lr", "refine(tune_lr=inf)",
        lambda e, a, t: _sc(a).refine(tune_lr=float("inf")), ValueError,
        "tune_lr must be a positive finite number"),
    Row("refine-mix", "refine(mix=2)", lambda e, a, t: _sc(a).refine(mix=2), ValueError,
        "mix must be a number in [0, 1]"),
    Row("embed-missing-genes", "embed() data that lack model genes",
        lambda e, a, t: _sc(a).embed(a[:, :100].copy()), ValueError, "the data lack 200"),
    Row("embed-duplicate-genes", "embed() data with duplicated gene names",
        lambda e, a, t: _sc(e.sc()).embed(a), ValueError, "var_names_make_unique",
        make=_dup_genes),
    Row("embed-backed", "embed() a backed AnnData",
        lambda e, a, t: _sc(a).embed(ad.read_h5ad(e.paths["small"], backed="r")), ValueError,
        "backed data is not supported here"),
    Row("embed-anchored", "embed(anchored=True) before refine()",
        lambda e, a, t: _sc(a).embed(anchored=True), ValueError, "needs anchors"),
    # ---- resuming
    Row("resume-other-genes", "resume with another gene set of the same size",
        lambda e, a, t: _run(e.other_genes(), resume=e.paths["ckpt"]), ValueError,
        "in the checkpoint only"),
    Row("resume-fewer-genes", "resume with fewer genes",
        lambda e, a, t: _run(a[:, :250].copy(), resume=e.paths["ckpt"]), ValueError,
        "300 in the checkpoint, 250 here"),
    Row("resume-other-layer", "resume reading another layer",
        lambda e, a, t: _run(a, model_kw={"layer": "counts"}, resume=e.paths["ckpt"]),
        ValueError, "layer: None in the checkpoint, 'counts' here",
        make=lambda a: (a.layers.__setitem__("counts", a.X.copy()), a)[1]),
    Row("resume-other-batches", "resume with a batch key the checkpoint did not use",
        lambda e, a, t: _run(a, model_kw={"batch_key": "batch"}, resume=e.paths["ckpt"]),
        ValueError, "batch_key: None in the checkpoint, 'batch' here",
        make=_obs("batch", lambda a: np.where(np.arange(a.n_obs) % 2, "b1", "b0"))),
    Row("resume-refine", "run() resumes a checkpoint of refine()",
        lambda e, a, t: _run(a, model_kw={"class_key": "bulk_labels"},
                             resume=e.paths["refine_ckpt"]),
        ValueError, "written by refine()"),
    Row("resume-spatial-in-sc", "scModel resumes a spatial checkpoint",
        lambda e, a, t: _run(a, resume=e.paths["st_ckpt"]), ValueError,
        "workflow: 'stModel' in the checkpoint, 'scModel' here"),
    # ---- checkpoint files
    Row("ckpt-missing", "the checkpoint does not exist",
        lambda e, a, t: _run(a, resume=t / "none.pt"), FileNotFoundError, "does not exist"),
    Row("ckpt-folder", "the checkpoint is a folder", lambda e, a, t: _run(a, resume=t),
        FileNotFoundError, "is a folder"),
    Row("ckpt-text", "a text file", lambda e, a, t: _run(a, resume=e.paths["text"]),
        ValueError, "not a file written by torch.save"),
    Row("ckpt-random", "random bytes", lambda e, a, t: _run(a, resume=e.paths["random"]),
        ValueError, "not a file written by torch.save"),
    Row("ckpt-truncated", "a truncated checkpoint",
        lambda e, a, t: _run(a, resume=e.paths["truncated"]), ValueError,
        "corrupt or truncated"),
    Row("ckpt-pickled-objects", "a pickle of arbitrary objects",
        lambda e, a, t: _run(a, resume=e.paths["pickled"]), ValueError, "could run code"),
    Row("ckpt-state-dict", "a model's state_dict instead of a checkpoint",
        lambda e, a, t: _run(a, resume=e.paths["state_dict"]), ValueError,
        "without the checkpoint format marker"),
    Row("ckpt-no-model", "a checkpoint dict without the model",
        lambda e, a, t: _run(a, resume=e.paths["no_model"]), ValueError,
        "incomplete checkpoint: it lacks ['model']"),
    Row("ckpt-no-metadata", "a checkpoint that records no genes",
        lambda e, a, t: _run(a, resume=e.paths["no_metadata"]), ValueError,
        "records no gene names"),
    # ---- saved models
    Row("load-missing", "load() from a folder that does not exist",
        lambda e, a, t: __import__("step.workflows").workflows.scModel.load(t / "none", a),
        FileNotFoundError, "is not a folder written by save"),
    Row("load-corrupt-config", "a corrupt config.json",
        lambda e, a, t: _load(t / "saved", a), ValueError, "config.json' is not a readable",
        setup=lambda e, t: _saved_copy(e, t, config=b'{"format": 1, "genes": [')),
    Row("load-config-no-genes", "config.json without the gene list",
        lambda e, a, t: _load(t / "saved", a), ValueError, "lacks ['genes']",
        setup=lambda e, t: _saved_copy(e, t, drop="genes")),
    Row("load-corrupt-model", "a corrupt model.pt", lambda e, a, t: _load(t / "saved", a),
        ValueError, "not a readable tensor file",
        setup=lambda e, t: _saved_copy(e, t, model=b"PK\x03\x04 broken")),
    Row("load-wrong-workflow", "stModel.load() of an scModel folder",
        lambda e, a, t: __import__("step.workflows").workflows.stModel.load(
            e.paths["saved"], a), ValueError, "was saved by 'scModel', not 'stModel'"),
    Row("load-missing-genes", "load() for data without the model's genes",
        lambda e, a, t: _load(e.paths["saved"], a[:, 50:].copy()), ValueError,
        "the data lack 50 of the 300 genes"),
    Row("load-duplicate-genes", "load() for data with duplicated gene names",
        lambda e, a, t: _load(e.paths["saved"], a), ValueError, "var_names_make_unique",
        make=_dup_genes),
    # ---- spatial input
    Row("st-spatial-key", "spatial_key names no obsm entry",
        lambda e, a, t: _st(a, spatial_key="xy"), KeyError, "spatial_key 'xy' not found",
        data="st"),
    Row("st-section-key", "section_key names no obs column",
        lambda e, a, t: _st(a, section_key="slide"), KeyError, "section_key 'slide' not found",
        data="st"),
    Row("st-section-missing", "a section label is missing", lambda e, a, t: _st(a),
        ValueError, "missing values", data="st",
        make=_obs("section", lambda a: pd.Series(["s0", None] * (a.n_obs // 2),
                                                 index=a.obs_names))),
    Row("st-identical-coordinates", "all coordinates identical", lambda e, a, t: _st(a),
        ValueError, "have the same coordinates", data="st",
        make=_coords(lambda c: np.ones_like(c))),
    Row("st-nan-coordinates", "NaN coordinates", lambda e, a, t: _st(a), ValueError,
        "has 1 cells with NaN or infinite coordinates", data="st",
        make=_coords(lambda c: np.where(np.arange(len(c))[:, None] == 3, np.nan, c))),
    Row("st-one-column", "coordinates with one column", lambda e, a, t: _st(a), ValueError,
        "must have shape (n_cells, >=2)", data="st", make=_coords(lambda c: c[:, :1])),
    Row("st-tiny-radius", "a radius so small the graph has only self-loops",
        lambda e, a, t: _st(a, graph_method="radius", radius=1e-9), ValueError,
        "links no spot to another one", data="st"),
    Row("st-radius-missing", "graph_method='radius' without a radius",
        lambda e, a, t: _st(a, graph_method="radius"), TypeError,
        "radius must be a positive finite number", data="st"),
    Row("st-radius-with-knn", "a radius with graph_method='knn'",
        lambda e, a, t: _st(a, radius=5.0), ValueError, "only used with graph_method='radius'",
        data="st"),
    Row("st-graph-method", "an unknown graph method",
        lambda e, a, t: _st(a, graph_method="delaunay"), ValueError, "graph_method must be",
        data="st"),
    Row("st-k-zero", "k=0", lambda e, a, t: _st(a, k=0), ValueError,
        "k must be a positive integer", data="st"),
    Row("st-mode", "an unknown training mode", lambda e, a, t: _st_run(a, mode="joint"),
        ValueError, "mode must be one of", data="st"),
    Row("st-tune-lr", "tune_lr=inf", lambda e, a, t: _st_run(a, tune_lr=float("inf")),
        ValueError, "tune_lr must be a positive finite number", data="st"),
    Row("st-same-keys", "key_added equal to smoothed_key",
        lambda e, a, t: _st_run(a, key_added="X", smoothed_key="X"), ValueError,
        "must differ", data="st"),
    Row("st-resume-other-mode", "a two-stage checkpoint resumed with mode='end-to-end'",
        lambda e, a, t: _st_run(a, mode="end-to-end", resume=e.paths["st_ckpt"]), ValueError,
        "cannot be resumed with mode='end-to-end'", data="st"),
    Row("st-resume-corrupt", "stModel resumes a text file",
        lambda e, a, t: _st_run(a, resume=e.paths["text"]), ValueError,
        "not a file written by torch.save", data="st"),
    Row("st-resume-other-k", "resume with another number of neighbours",
        lambda e, a, t: _st_run(a, model_kw={"k": 4}, resume=e.paths["st_ckpt"]), ValueError,
        "k: 6 in the checkpoint, 4 here", data="st"),
    Row("st-cluster-before-run", "cluster() before run()", lambda e, a, t: _st(a).cluster(3),
        KeyError, "use_rep 'X_smoothed' not found", data="st"),
    # ---- the command line
    Row("cli-no-command", "no sub-command", _cli(), 2, "required"),
    Row("cli-unknown-option", "a misspelt option (--epoch)", _fit("--epoch", "3"), 2,
        "unrecognized arguments: --epoch"),
    Row("cli-lr-inf", "--lr inf", _fit("--lr", "inf"), 2,
        "argument --lr: expected a positive finite number, got 'inf'"),
    Row("cli-lr-negative", "--lr=-1e-3", _fit("--lr=-1e-3"), 2,
        "expected a positive finite number, got '-1e-3'"),
    Row("cli-lr-text", "--lr fast", _fit("--lr", "fast"), 2,
        "expected a positive number, got 'fast'"),
    Row("cli-seed-negative", "--seed -1", _fit("--seed", "-1"), 2,
        "argument --seed: expected an integer in [0, 4294967295], got -1"),
    Row("cli-epochs-zero", "--epochs 0", _fit("--epochs", "0"), 2,
        "expected a positive integer, got 0"),
    Row("cli-refine-negative", "--refine-epochs -5", _fit("--refine-epochs", "-5"), 2,
        "expected an integer >= 0, got -5"),
    Row("cli-refine-no-class-key", "--refine-epochs without --class-key",
        _fit("--refine-epochs", "2"), 2, "--refine-epochs needs --class-key"),
    Row("cli-spatial-no-n-clusters", "--spatial without --n-clusters", _fit("--spatial"), 2,
        "--spatial needs --n-clusters"),
    Row("cli-spatial-option-alone", "--section-key without --spatial",
        _fit("--section-key", "section"), 2, "--section-key only apply with --spatial"),
    Row("cli-refine-spatial", "--refine-epochs with --spatial",
        _fit("--spatial", "--n-clusters", "3", "--refine-epochs", "2", "--class-key", "x"), 2,
        "does not apply with --spatial"),
    Row("cli-device", "--device tpu", _fit("--device", "tpu"), 2,
        "--device must be cpu, cuda, cuda:<n> or auto"),
    Row("cli-cuda", "--device cuda without a GPU", _no_cuda(_fit("--device", "cuda")), 2,
        "CUDA is not available"),
    Row("cli-input-missing", "the input file does not exist",
        _cli("fit", "{tmp}/none.h5ad", "--out", "{tmp}/out"), 2, "does not exist"),
    Row("cli-input-folder", "the input is a folder", _cli("fit", "{tmp}", "--out", "{tmp}/o"),
        2, "is a folder, not an .h5ad file"),
    Row("cli-input-csv", "a CSV file renamed .h5ad",
        _cli("fit", "{csv}", "--out", "{tmp}/out"), 2, "is not an .h5ad file"),
    Row("cli-inputs-genes-unmatched", "several inputs whose genes cannot be matched",
        _cli("fit", "{small}", "{fewer_genes}", "--out", "{tmp}/out"), 2, "lacks 50 genes"),
    Row("cli-zarr-spatial", "a .zarr store with --spatial",
        _cli("fit", "{small_zarr}", "--out", "{tmp}/out", "--spatial", "--n-clusters", "3"),
        2, "is for single-cell data, not --spatial"),
    Row("cli-copy-counts-unbacked", "--copy-counts without --backed",
        _fit("--copy-counts"), 2, "--copy-counts applies with --backed"),
    Row("cli-copy-counts-inputs", "--copy-counts with several inputs",
        _cli("fit", "{small}", "{small_zarr}", "--out", "{tmp}/out", "--copy-counts"), 2,
        "--copy-counts needs one input file"),
    Row("cli-genes-empty", "--genes names an empty file", _fit("--genes", "{tmp}/genes.txt"),
        2, "lists no gene names", setup=_write("genes.txt", b"\n")),
    Row("cli-genes-unknown", "--genes lists a gene the input lacks",
        _fit("--genes", "{tmp}/genes.txt"), 2, "the data lack 1 of the 1 genes",
        setup=_write("genes.txt", b"NOT_A_GENE\n")),
    Row("cli-input-truncated", "a truncated .h5ad file",
        _cli("fit", "{truncated_h5ad}", "--out", "{tmp}/out"), 2, "cannot read"),
    Row("cli-missing-layer", "--layer names no layer", _fit("--layer", "counts"), 2,
        "layer 'counts' not found"),
    Row("cli-missing-class-key", "--class-key names no obs column",
        _fit("--class-key", "cell_type"), 2, "class_key 'cell_type' not found"),
    Row("cli-duplicate-genes", "an input with duplicated gene names",
        _cli("fit", "{dup}", "--out", "{tmp}/out"), 2, "var_names_make_unique"),
    Row("cli-one-cell", "an input with one cell",
        _cli("fit", "{one_cell}", "--out", "{tmp}/out"), 2, "needs at least 2"),
    Row("cli-out-file", "--out is a file", _fit(), 2, "out' is a file",
        setup=_write("out")),
    Row("cli-out-under-file", "--out lies under a file",
        _cli("fit", "{small}", "--out", "{tmp}/file/out"), 2, "lies under",
        setup=_write("file")),
    Row("cli-checkpoints-file", "OUT/run/checkpoints is a file", _fit(), 2,
        "is a file where step writes a folder", setup=_write("out/run/checkpoints")),
    Row("cli-out-previous-run", "--out holds a previous run (without --overwrite)", _fit(), 2,
        "holds a previous run", setup=_previous_run),
    Row("cli-out-foreign", "--out holds files step did not write", _fit("--overwrite"), 2,
        "holds files step did not write (notes.txt)", setup=_write("out/notes.txt")),
    Row("cli-resume-missing", "--resume names no file", _fit("--resume", "{tmp}/none.pt"), 2,
        "--resume: checkpoint"),
    Row("cli-resume-text", "--resume names a text file", _fit("--resume", "{text}"), 2,
        "not a file written by torch.save"),
    Row("cli-resume-other-genes", "--resume with another gene set of the same size",
        _cli("fit", "{other_genes}", "--out", "{tmp}/out", "--resume", "{ckpt}"), 2,
        "in the checkpoint only"),
    Row("cli-n-clusters", "--n-clusters above the number of spots",
        _cli("fit", "{spatial}", "--out", "{tmp}/out", "--spatial", "--section-key",
             "section", "--n-clusters", "100000"), 2, "--n-clusters 100000 exceeds the"),
    Row("cli-spatial-key", "--spatial-key names no obsm entry",
        _cli("fit", "{spatial}", "--out", "{tmp}/out", "--spatial", "--n-clusters", "3",
             "--spatial-key", "xy"), 2, "spatial_key 'xy' not found"),
    Row("cli-resume-other-mode", "a two-stage checkpoint resumed with --mode end-to-end",
        _cli("fit", "{spatial}", "--out", "{tmp}/out", "--spatial", "--section-key",
             "section", "--n-clusters", "3", "--mode", "end-to-end", "--resume", "{st_ckpt}"),
        2, "cannot be resumed with mode='end-to-end'"),
    Row("cli-demo-out-previous-run", "step demo into a previous run",
        _cli("demo", "--out", "{tmp}/out"), 2, "holds a previous run", setup=_previous_run),
    Row("cli-demo-resume-text", "step demo --resume names a text file",
        _cli("demo", "--out", "{tmp}/out", "--resume", "{text}"), 2,
        "not a file written by torch.save"),
]


class _TruncateAt:
    """Truncates ``path`` after optimizer step ``step``."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, step: int) -> None:
        if step == self.step:
            self.path.write_bytes(self.path.read_bytes()[:4096])


def _truncated_while_training(env: Any) -> Any:
    """Train on a copy of the small file (in a folder of its own) that is cut mid-epoch."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "cells.h5ad"
        copy.write_bytes(Path(env.paths["small"]).read_bytes())
        model = _sc(str(copy))
        # 160 training cells: 5 steps of 32 per epoch; cut in the second epoch
        return model.run(epochs=2, batch_size=32, verbose=False, checkpoint_dir=folder,
                         callbacks=[_TruncateAt(copy, 7)])


def _load(folder: Path, adata: ad.AnnData) -> Any:
    from step.workflows import scModel

    return scModel.load(folder, adata)


def _saved_copy(env: Any, tmp: Path, *, config: bytes | None = None, drop: str | None = None,
                model: bytes | None = None) -> None:
    """A copy of the saved model in ``tmp/saved`` with one file broken."""
    source, folder = Path(env.paths["saved"]), tmp / "saved"
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    if config is not None:
        (folder / "config.json").write_bytes(config)
    if drop is not None:
        record = json.loads((folder / "config.json").read_text())
        del record[drop]
        (folder / "config.json").write_text(json.dumps(record))
    if model is not None:
        (folder / "model.pt").write_bytes(model)


# ---------------------------------------------------------------------- environment
class Env:
    """The shared inputs: two small AnnData objects, files made from them, checkpoints."""

    def __init__(self, root: Path, pbmc: ad.AnnData, spatial: ad.AnnData) -> None:
        self.root = root
        self._sc = pbmc[:N_CELLS, :N_GENES].copy()
        self._sc.X = sp.csr_matrix(self._sc.X)
        self._other = pbmc[:N_CELLS, N_GENES:2 * N_GENES].copy()
        self._fewer_genes = pbmc[N_CELLS:2 * N_CELLS, 50:N_GENES].copy()
        self._fewer_genes.X = sp.csr_matrix(self._fewer_genes.X)
        section = spatial[spatial.obs["section"] == spatial.obs["section"].iloc[0]]
        self._st = section[:300, :200].copy()
        self.paths: dict[str, str] = {}

    def sc(self) -> ad.AnnData:
        return self._sc.copy()

    def st(self) -> ad.AnnData:
        return self._st.copy()

    def other_genes(self) -> ad.AnnData:
        return self._other.copy()

    def build(self) -> None:
        from step.workflows import scModel

        root = self.root
        self._h5ad("small", self.sc())
        self._h5ad("other_genes", self.other_genes())
        self._h5ad("dup", _dup_genes(self.sc()))
        self._h5ad("one_cell", self.sc()[:1].copy())
        self._h5ad("fewer_genes", self._fewer_genes)
        self._h5ad("dense", _set("X", lambda a: a.X.toarray())(self.sc()))
        self._h5ad("no_x", _no_x(self.sc()))
        self._h5ad("lognorm", _with_x(np.log1p)(self.sc()))
        path = self.root / "small.zarr"
        self.sc().write_zarr(path)
        self.paths["small_zarr"] = str(path)
        self._h5ad("spatial", self.st())
        self._file("csv", "data.h5ad", b"cell,CD3E\nAAAC,3\n")
        self._file("truncated_h5ad", "truncated.h5ad",
                   Path(self.paths["small"]).read_bytes()[:4096])
        self._file("text", "notes.pt", b"hello, this is not a checkpoint\n")
        self._file("random", "random.pt", np.random.default_rng(0).bytes(2048).replace(
            b"\x80", b"\x00").replace(b"PK", b"pk"))

        model = scModel(self.sc(), **SMALL)
        model.run(epochs=1, checkpoint_dir=root / "sc", verbose=False)
        self.paths["ckpt"] = str(root / "sc" / "checkpoint.pt")
        model.save(root / "saved")
        self.paths["saved"] = str(root / "saved")
        state = torch.load(self.paths["ckpt"], weights_only=True)
        self._file("truncated", "truncated.pt",
                   Path(self.paths["ckpt"]).read_bytes()[:2000])
        self._torch("state_dict", model.model.state_dict())
        self._torch("no_model", {k: v for k, v in state.items() if k != "model"})
        self._torch("no_metadata", {k: v for k, v in state.items() if k != "metadata"})
        with open(root / "pickled.pt", "wb") as handle:
            pickle.dump({"format": 1, "model": _Anything()}, handle)
        self.paths["pickled"] = str(root / "pickled.pt")

        labelled = scModel(self.sc(), class_key="bulk_labels", **SMALL)
        labelled.run(epochs=1, verbose=False)
        labelled.refine(epochs=1, verbose=False)
        labelled.trainer.save_checkpoint(root / "refine.pt")
        self.paths["refine_ckpt"] = str(root / "refine.pt")

        from step.workflows import stModel

        st = stModel(self.st(), section_key="section", **SMALL)
        st.run(epochs=1, graph_epochs=1, checkpoint_dir=root / "st", verbose=False)
        self.paths["st_ckpt"] = str(root / "st" / "checkpoint.pt")

    def _h5ad(self, name: str, adata: ad.AnnData) -> None:
        path = self.root / f"{name}.h5ad"
        adata.write_h5ad(path)
        self.paths[name] = str(path)

    def _file(self, name: str, filename: str, content: bytes) -> None:
        path = self.root / filename
        path.write_bytes(content)
        self.paths[name] = str(path)

    def _torch(self, name: str, obj: Any) -> None:
        path = self.root / f"{name}.pt"
        torch.save(obj, path)
        self.paths[name] = str(path)


class _Anything:
    """A class that a safe unpickler refuses to import."""


@pytest.fixture(scope="module")
def env(tmp_path_factory, _pbmc_counts_session, _spatial_session) -> Env:
    torch.set_num_threads(1)
    environment = Env(tmp_path_factory.mktemp("bad-input"), _pbmc_counts_session,
                      _spatial_session)
    environment.build()
    return environment


# -------------------------------------------------------------------------- harness
def _snapshot(adata: Any) -> dict[str, Any]:
    if not isinstance(adata, ad.AnnData):
        return {}
    x = adata.X
    return {
        "obs": adata.obs.copy(), "var": adata.var.copy(),
        "X": None if x is None else (x.toarray() if sp.issparse(x) else np.array(x)),
        "obsm": {k: np.array(v) for k, v in adata.obsm.items()},
        "layers": {k: (v.toarray() if sp.issparse(v) else np.array(v))
                   for k, v in adata.layers.items()},
        "uns": sorted(adata.uns.keys()),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    if not a:
        return
    pd.testing.assert_frame_equal(a["obs"], b["obs"])
    pd.testing.assert_frame_equal(a["var"], b["var"])
    np.testing.assert_array_equal(a["X"], b["X"])
    assert a["obsm"].keys() == b["obsm"].keys() and a["layers"].keys() == b["layers"].keys()
    for part in ("obsm", "layers"):
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key])
    assert a["uns"] == b["uns"]


def _files(*folders: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, env: Env, tmp_path: Path, capsys) -> None:
    adata = env.sc() if row.data == "sc" else env.st()
    if row.make is not None:
        adata = row.make(adata)
    if row.setup is not None:
        row.setup(env, tmp_path)
    before, files = _snapshot(adata), _files(env.root, tmp_path)
    capsys.readouterr()
    if isinstance(row.error, int):
        assert row.call(env, adata, tmp_path) == row.error
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("step: error:")]
        assert len(lines) == 1, err
        assert "Traceback" not in err, err
        assert row.match in lines[0], lines[0]
    else:
        with pytest.raises(row.error, match=re.escape(row.match)):
            row.call(env, adata, tmp_path)
    _same(before, _snapshot(adata))
    assert _files(env.root, tmp_path) == files, "a file was changed"


def test_every_row_is_distinct_and_the_table_is_long() -> None:
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert len(ROWS) >= 60


# ---------------------------------------------------------------------- the doc page
def rst() -> str:
    """The documentation page listing every row."""
    head = [
        "Bad input",
        "=========",
        "",
        "Every case below is refused with the error shown and a message containing the",
        "fragment shown; the AnnData passed in and every input file are left as they were,",
        "and nothing is trained. Command-line cases end with exit status 2 and one line",
        "``step: error: ...`` (``--debug`` shows the traceback). The table is generated",
        "from the rows of ``tests/test_bad_input_table.py``, which checks every one.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 22 38 12 28",
        "",
        "   * - case",
        "     - problem",
        "     - error",
        "     - the message says",
    ]
    body = []
    for row in ROWS:
        error = f"exit {row.error}" if isinstance(row.error, int) else row.error.__name__
        problem = re.sub(r"(--[a-z][\w=.-]*)", r"``\1``", row.problem)  # options as code
        body += [f"   * - ``{row.id}``", f"     - {problem}", f"     - {error}",
                 f"     - ``{row.match}``"]
    return "\n".join(head + body) + "\n"


def test_the_doc_page_lists_every_row() -> None:
    assert DOC.read_text() == rst(), (
        "docs/guide/bad_input.rst is out of date; regenerate it with "
        "'python tests/test_bad_input_table.py > docs/guide/bad_input.rst'")


if __name__ == "__main__":
    sys.stdout.write(rst())
