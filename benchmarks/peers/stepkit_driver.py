#!/usr/bin/env python
"""Benchmark driver for the public STEP release (PyPI ``step-kit`` 0.3).

Run it with the python of the separate step-kit environment created by
``shared/peers/setup_stepkit.sh`` (default ``$HOME/.cache/step-peers/stepkit``). step-kit's
import name is also ``step``, so this script must never run in this repository's environment
and never imports this repository's package.

Input: a ``.h5ad`` file whose ``X`` holds integer counts (sparse or dense). Tasks:

``throughput``
    Trains the single-cell model (``step.scModel``) through its own ``run()`` with no
    validation split and reports steady-state training cells/s (the first epoch is excluded).
``quality``
    Trains ``step.scModel`` through ``run()`` and writes its ``X_rep`` embedding (step-kit
    returns a sample of the variational posterior) and, for reference, the posterior mean
    computed through the same inference path, both as ``.npy``.
``spatial``
    Trains the spatial model (``step.stModel``) end to end with the GraphSAINT node sampler
    (``Trainer.train_node_sampler``) through ``run()`` and reports iterations/s, plus the
    smoothed (``X_smoothed``) and unsmoothed embeddings as ``.npy``.

Architecture (all tasks): hidden_dim 64, n_modules 32, module_dim 30, ZINB likelihood; the
transformer keeps step-kit's defaults (8 heads, 3 encoder layers).

Example::

    ~/.cache/step-peers/stepkit/bin/python benchmarks/peers/stepkit_driver.py \
        /tmp/pbmc_counts.h5ad --task throughput --epochs 5 --out /tmp/sk_tp.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import sys
import time
import types
import warnings
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Make sure ``import step`` resolves to the installed step-kit, never to a source checkout.
# ---------------------------------------------------------------------------------------------


def _shadows_installed_step(entry: str) -> bool:
    path = os.path.abspath(entry or os.getcwd())
    return "site-packages" not in path and os.path.isdir(os.path.join(path, "step"))


sys.path[:] = [p for p in sys.path if not _shadows_installed_step(p)]

warnings.filterwarnings("ignore")
os.environ.setdefault("DGLBACKEND", "pytorch")

import numpy as np  # noqa: E402

# Compatibility shims, applied before step-kit is imported (its installed files stay untouched).
# 1. step-kit's EarlyStopping uses ``np.Inf``, which NumPy 2 removed.
if not hasattr(np, "Inf"):
    np.Inf = np.inf  # type: ignore[attr-defined]
# 2. step-kit's ``__init__`` imports ``pkg_resources`` (gone from setuptools >= 81); it only needs
#    ``get_distribution(name).version`` and ``DistributionNotFound``.
try:
    import pkg_resources  # noqa: F401
except ImportError:
    import importlib.metadata as _md

    _pr = types.ModuleType("pkg_resources")

    class _DistributionNotFound(Exception):
        pass

    def _get_distribution(name):
        try:
            return types.SimpleNamespace(version=_md.version(name))
        except _md.PackageNotFoundError as exc:
            raise _DistributionNotFound(name) from exc

    _pr.DistributionNotFound = _DistributionNotFound
    _pr.get_distribution = _get_distribution
    sys.modules["pkg_resources"] = _pr

import torch  # noqa: E402


def _import_stepkit():
    import importlib.metadata as md

    step = importlib.import_module("step")
    if not hasattr(step, "scModel"):
        raise RuntimeError(
            "step-kit imported without torch/dgl support (step.scModel missing); "
            "run this script with the step-kit environment's python"
        )
    if "site-packages" not in os.path.abspath(step.__file__):
        raise RuntimeError(f"'step' resolved to {step.__file__}, not to the installed step-kit")
    import dgl

    return step, md.version("step-kit"), dgl


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int, dgl_mod) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    dgl_mod.seed(seed)


def load_counts(path: str, args):
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(path)
    X = adata.X
    sample = X[: min(adata.n_obs, 200)]
    sample = sample.toarray() if sp.issparse(sample) else np.asarray(sample)
    if not np.allclose(sample, np.round(sample)) or (sample < 0).any():
        raise ValueError("X must hold non-negative integer counts")
    # step-kit's own cell/mitochondrial filtering calls ``.toarray()`` on X and therefore needs
    # a sparse matrix.
    if args.filter and not sp.issparse(X):
        adata.X = sp.csr_matrix(X)
    adata.obs_names_make_unique()
    adata.var_names_make_unique()
    return adata


def model_kwargs(args) -> dict:
    return dict(
        n_top_genes=args.n_top_genes,
        filtered=not args.filter,
        hidden_dim=args.hidden_dim,
        n_modules=args.n_modules,
        module_dim=args.module_dim,
        decoder_type=args.decoder,
        device=args.device,
    )


class StepClock:
    """Records a timestamp after every optimizer step of a step-kit functional model."""

    def __init__(self, functional):
        self.times: list[float] = []
        original = functional.update_model_params

        def timed_update(loss_dict, epoch):
            original(loss_dict, epoch)
            if functional.device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self._last = {k: v.detach() for k, v in loss_dict.items() if isinstance(v, torch.Tensor)}

        self._last: dict = {}
        functional.update_model_params = timed_update

    @property
    def last_loss(self):
        return {k: float(v) for k, v in self._last.items()} or None


def posterior_mean_readout(model):
    """Context manager making step-kit's variational readout return its mean instead of a sample.

    step-kit's ``Readout.forward`` always returns ``dist.rsample()`` (also in eval mode) and keeps
    the mean in ``readout.mu``; this swaps the bound forward on the instance only.
    """

    class _Ctx:
        def __enter__(self):
            readout = model.readout
            self.readout = readout
            if not getattr(readout, "variational", False):
                return self
            original = readout.forward

            def mean_forward(x):
                original(x)
                return readout.mu

            readout.forward = mean_forward
            return self

        def __exit__(self, *exc):
            self.readout.__dict__.pop("forward", None)
            return False

    return _Ctx()


def cpu_probe(repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds for a fixed float32 matmul workload (detects a slowed host)."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        best = min(best, time.perf_counter() - t)
    return best


def n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def out_prefix(args) -> Path:
    out = Path(args.out).resolve()
    return out.with_suffix("")


def save_npy(array, prefix: Path, name: str) -> str:
    path = Path(f"{prefix}_{name}.npy")
    np.save(path, np.asarray(array, dtype=np.float32))
    return str(path)


def steady_rate(times: list[float], start: float, per_unit: float, skip: int):
    """Rate (units/s) over timestamps after the first ``skip`` units."""
    if len(times) <= skip:
        return None
    t0 = start if skip == 0 else times[skip - 1]
    span = times[-1] - t0
    return per_unit * (len(times) - skip) / span if span > 0 else None


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def build_sc(step, adata, args):
    return step.scModel(adata=adata, batch_key=args.batch_key, **model_kwargs(args))


def run_sc(sk, args, epochs, split_rate, clock_start_holder):
    """Calls step-kit's own run() with consistent hyper-parameters."""
    kwargs = dict(epochs=epochs, batch_size=args.batch_size, split_rate=split_rate, lr=args.lr)
    if sk.dataset.num_batches > 1:
        # scMultiBatchNrmls.run(epochs, batch_size, lr, split_rate, ..., beta1, ...); no class
        # key is given, so the anchor refinement stage is skipped.
        kwargs["beta1"] = args.beta
    else:
        # FunctionalBase.run(epochs, batch_size, split_rate, ..., beta, lr)
        kwargs["beta"] = args.beta
    clock_start_holder.append(time.perf_counter())
    sk.run(**kwargs)


def task_throughput(step, adata, args, info):
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch is excluded)")
    sk = build_sc(step, adata, args)
    fm = sk._functional
    clock = StepClock(fm)
    start = []
    t_run = time.perf_counter()
    run_sc(sk, args, args.epochs, 0.0, start)
    run_seconds = time.perf_counter() - t_run
    n_cells = len(sk.dataset)
    steps_per_epoch = -(-n_cells // args.batch_size)
    n_steps = len(clock.times)
    if n_steps != steps_per_epoch * args.epochs:
        raise RuntimeError(f"expected {steps_per_epoch * args.epochs} steps, saw {n_steps}")
    ends = [clock.times[(e + 1) * steps_per_epoch - 1] for e in range(args.epochs)]
    epoch_seconds = [ends[0] - start[0]] + [ends[e] - ends[e - 1] for e in range(1, args.epochs)]
    steady = epoch_seconds[1:]
    info.update(
        model_class=type(fm).__name__,
        n_params=n_params(fm.model),
        n_cells=n_cells,
        n_genes=int(sk.dataset.gene_expr.shape[1]),
        n_batches=int(sk.dataset.num_batches),
        epochs=args.epochs,
        steps_per_epoch=steps_per_epoch,
        epoch_seconds=epoch_seconds,
        step_seconds=np.diff(np.asarray(start[:1] + clock.times)).tolist(),
        first_epoch_seconds=epoch_seconds[0],
        steady_epoch_seconds_mean=float(np.mean(steady)),
        steady_epoch_seconds_median=float(np.median(steady)),
        cells_per_s=n_cells * len(steady) / float(np.sum(steady)),
        cells_per_s_median_epoch=n_cells / float(np.median(steady)),
        cells_per_s_best_epoch=n_cells / float(np.min(steady)),
        run_seconds_including_embedding=run_seconds,
        final_loss=clock.last_loss,
    )


def task_quality(step, adata, args, info):
    sk = build_sc(step, adata, args)
    fm = sk._functional
    clock = StepClock(fm)
    start = []
    t0 = time.perf_counter()
    run_sc(sk, args, args.epochs, args.split_rate, start)
    train_seconds = time.perf_counter() - t0
    prefix = out_prefix(args)
    rep = sk.adata.obsm["X_rep"]
    with posterior_mean_readout(fm.model):
        rep_mean = fm.embed(dataset=sk.dataset)
    obs_path = Path(f"{prefix}_obs_names.txt")
    obs_path.write_text("\n".join(map(str, sk.adata.obs_names)) + "\n")
    info.update(
        model_class=type(fm).__name__,
        n_params=n_params(fm.model),
        n_cells=int(sk.adata.n_obs),
        n_genes=int(sk.dataset.gene_expr.shape[1]),
        n_batches=int(sk.dataset.num_batches),
        epochs_requested=args.epochs,
        steps_run=len(clock.times),
        split_rate=args.split_rate,
        train_seconds=train_seconds,
        final_loss=clock.last_loss,
        embedding=save_npy(rep, prefix, "X_rep"),
        embedding_mean=save_npy(rep_mean, prefix, "X_rep_mean"),
        obs_names=str(obs_path),
    )


def _prepare_coords(adata, args):
    key = args.coords
    if "," in key:
        cols = [c.strip() for c in key.split(",")]
        if len(cols) != 2 or any(c not in adata.obs for c in cols):
            raise SystemExit(f"--coords {key!r}: need two columns of adata.obs")
        return tuple(cols)
    if key not in adata.obsm:
        raise SystemExit(f"--coords {key!r} is neither 'col_a,col_b' of obs nor an obsm key")
    xy = np.asarray(adata.obsm[key], dtype=np.float64)[:, :2]
    adata.obs["_coord_0"] = xy[:, 0]
    adata.obs["_coord_1"] = xy[:, 1]
    return ("_coord_0", "_coord_1")


def _edge_clip(value: str):
    if value == "knn":
        return None
    if value == "visium":
        return "visium"
    return float(value)


def task_spatial(step, adata, args, info):
    coord_keys = _prepare_coords(adata, args)
    section_key = args.section_key or args.batch_key
    if args.section_key and args.batch_key and args.batch_key != args.section_key:
        info["note"] = "step-kit's stModel has one key; --section-key is used as its batch_key"
    if section_key is not None:
        adata.obs[section_key] = adata.obs[section_key].astype(str).astype("category")
    sk = step.stModel(
        adata=adata,
        batch_key=section_key,
        coord_keys=coord_keys,
        edge_clip=_edge_clip(args.edge_clip),
        max_neighbors=args.max_neighbors,
        n_glayers=args.n_glayers,
        dispersion=args.dispersion,
        variational=True,
        **model_kwargs(args),
    )
    fm = sk._functional
    clock = StepClock(fm)
    phase = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            res = fn(*a, **k)
            phase[name] = phase.get(name, 0.0) + time.perf_counter() - t
            return res

        return wrapper

    fm.from_spatial_graph = timed("graph_build_seconds", fm.from_spatial_graph)
    fm.gembed = timed("smoothed_inference_seconds", fm.gembed)
    original_sampler_loop = fm.train_node_sampler
    loop_start = []

    def sampler_loop(*a, **k):
        loop_start.append(time.perf_counter())
        return original_sampler_loop(*a, **k)

    fm.train_node_sampler = sampler_loop

    t0 = time.perf_counter()
    sk.run(
        e2e=True,
        sampling="saint",
        n_samples=args.n_samples,
        n_iterations=args.n_iterations,
        graph_batch_size=args.graph_batch_size,
        sample_rate=args.sample_rate,
        beta=args.spatial_beta,
        lr=args.lr,
    )
    run_seconds = time.perf_counter() - t0
    if not loop_start:
        raise RuntimeError("step-kit did not run train_node_sampler")
    times = clock.times
    n_it = len(times)
    warm = min(args.warmup_iterations, max(n_it - 2, 0))
    loop_seconds = times[-1] - loop_start[0]
    prefix = out_prefix(args)
    smoothed = sk.adata.obsm["X_smoothed"]
    unsmoothed = fm.embed(dataset=sk.dataset)
    with posterior_mean_readout(fm.model):
        smoothed_mean = fm.gembed(dataset=sk.dataset)
        unsmoothed_mean = fm.embed(dataset=sk.dataset)
    step_s = np.diff(np.asarray([loop_start[0]] + times))
    info.update(
        model_class=type(fm).__name__,
        n_params=n_params(fm.model),
        n_cells=int(sk.adata.n_obs),
        n_genes=int(sk.dataset.gene_expr.shape[1]),
        n_sections=int(sk.dataset.num_batches),
        coord_keys=list(coord_keys),
        edge_clip=args.edge_clip,
        max_neighbors=args.max_neighbors,
        sampler=(
            f"SAINTSampler(mode='node', budget={args.n_samples})"
            if sk.dataset.num_batches == 1
            else f"MultiGraphsAllNodesSampler(n_graphs={args.graph_batch_size}, ratio={args.sample_rate})"
        ),
        iterations=n_it,
        warmup_iterations_excluded=warm,
        iters_per_s=steady_rate(times, loop_start[0], 1.0, warm),
        iters_per_s_all=n_it / loop_seconds if loop_seconds > 0 else None,
        iters_per_s_median_step=1.0 / float(np.median(step_s[warm:])),
        step_seconds_median=float(np.median(step_s[warm:])),
        step_seconds_p10=float(np.percentile(step_s[warm:], 10)),
        step_seconds_p90=float(np.percentile(step_s[warm:], 90)),
        step_seconds=step_s.tolist(),
        sampler_loop_seconds=loop_seconds,
        run_seconds=run_seconds,
        final_loss=clock.last_loss,
        smoothed=save_npy(smoothed, prefix, "X_smoothed"),
        unsmoothed=save_npy(unsmoothed, prefix, "X_unsmoothed"),
        smoothed_mean=save_npy(smoothed_mean, prefix, "X_smoothed_mean"),
        unsmoothed_mean=save_npy(unsmoothed_mean, prefix, "X_unsmoothed_mean"),
        **phase,
    )


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("h5ad", help=".h5ad file with integer counts in X")
    p.add_argument("--task", choices=["throughput", "quality", "spatial"], required=True)
    p.add_argument("--epochs", type=int, default=5, help="sc training epochs (throughput, quality)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-key", default=None, help="obs column with batches (sc tasks)")
    p.add_argument("--section-key", default=None, help="obs column with sections (spatial)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", required=True, help="result .json; .npy files are written beside it")
    # model
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--n-modules", type=int, default=32)
    p.add_argument("--module-dim", type=int, default=30)
    p.add_argument("--decoder", default="zinb", choices=["zinb", "nb", "poisson"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=1e-2, help="KL weight of sc training")
    p.add_argument(
        "--n-top-genes", type=int, default=None,
        help="let step-kit select this many HVGs (seurat_v3); default: use every gene of the file",
    )
    p.add_argument(
        "--filter", action="store_true",
        help="apply step-kit's own MT-gene and min_genes=10 cell filtering (off by default)",
    )
    p.add_argument(
        "--split-rate", type=float, default=0.2,
        help="validation fraction for --task quality (step-kit default 0.2); throughput uses 0",
    )
    # spatial
    p.add_argument("--coords", default="spatial", help="obsm key, or 'col_x,col_y' of obs")
    p.add_argument(
        "--edge-clip", default="knn",
        help="'knn' (k = --max-neighbors, self included), a radius, or 'visium' (hex grid)",
    )
    p.add_argument("--max-neighbors", type=int, default=10)
    p.add_argument("--n-glayers", type=int, default=4)
    p.add_argument("--dispersion", default="gene", choices=["gene", "batch-gene"])
    p.add_argument("--n-iterations", type=int, default=200, help="node-sampler iterations")
    p.add_argument("--n-samples", type=int, default=1024, help="node budget per iteration (one section)")
    p.add_argument("--graph-batch-size", type=int, default=1, help="sections per iteration (several sections)")
    p.add_argument("--sample-rate", type=float, default=1.0, help="fraction of nodes per drawn section")
    p.add_argument("--spatial-beta", type=float, default=1e-3, help="KL weight of spatial training")
    p.add_argument("--warmup-iterations", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    step, stepkit_version, dgl_mod = _import_stepkit()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, dgl_mod)
    adata = load_counts(args.h5ad, args)
    info = dict(
        tool="step-kit",
        version=stepkit_version,
        task=args.task,
        input=os.path.abspath(args.h5ad),
        torch=torch.__version__,
        dgl=dgl_mod.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        device=args.device,
        threads=torch.get_num_threads(),
        seed=args.seed,
        batch_key=args.batch_key,
        section_key=args.section_key,
        config=dict(
            hidden_dim=args.hidden_dim,
            n_modules=args.n_modules,
            module_dim=args.module_dim,
            decoder=args.decoder,
            batch_size=args.batch_size,
            lr=args.lr,
            beta=args.beta if args.task != "spatial" else args.spatial_beta,
            nhead=8,
            n_enc_layer=3,
        ),
    )
    info["cpu_probe_seconds_before"] = cpu_probe()
    t0 = time.perf_counter()
    {"throughput": task_throughput, "quality": task_quality, "spatial": task_spatial}[args.task](
        step, adata, args, info
    )
    info["total_seconds"] = time.perf_counter() - t0
    info["cpu_probe_seconds_after"] = cpu_probe()
    Path(args.out).write_text(json.dumps(info, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, list)}, indent=2, default=float))


if __name__ == "__main__":
    main()
