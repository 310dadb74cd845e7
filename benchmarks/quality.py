"""Cell-type structure of single-cell embeddings on the PBMC counts.

Embeddings of the 700 PBMCs shipped with the package (765 genes) are clustered with one
procedure and compared with the ``bulk_labels`` annotation (10 cell types) by the
adjusted Rand index (ARI) and normalised mutual information (NMI):

- ``step``: the ``step.workflows.scModel`` workflow as users call it
  (``scModel(adata, seed=s).run(epochs=E)``: its default model and training settings,
  20 % validation split, early stopping), ``obsm["X_rep"]`` (posterior means);
- PCA: 50 principal components of ``log1p(counts / total × 1e4)`` (scanpy);
- step-kit 0.3: ``scModel(...).run()`` through ``benchmarks/peers/stepkit_driver.py``
  with the same epochs (hidden 64, 32 modules of size 30, ZINB, KL weight 0.01): its
  ``X_rep`` as returned (a posterior sample) and its posterior mean;
- ``step`` under bf16 autocast (full mode), to check that the faster path keeps the
  embedding quality;
- scVI: only when ``scvi`` is importable in this environment (it is not installed by
  these scripts).

Clustering (the same for every embedding): scanpy's kNN graph (15 neighbours) on the
embedding, then Leiden at each resolution of a fixed grid (0.1, 0.2, ..., 2.0); the
resolution whose cluster count is closest to the number of labels is kept (the lowest on
ties). The best ARI over the whole grid (the optimal-resolution rule of integration
benchmarks) is reported too. Every method runs with 3 seeds (training and clustering);
mean ± sd.

Usage::

    python benchmarks/quality.py --quick        # 20 epochs per model
    python benchmarks/quality.py                # 100 epochs per model
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

from step.datasets import pbmc68k_counts

LABEL_KEY = "bulk_labels"
RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))
N_NEIGHBORS = 15


def leiden_grid(rep: np.ndarray, seed: int) -> list[tuple[float, np.ndarray]]:
    """Leiden labels at every resolution of the grid, on one kNN graph of ``rep``."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(np.zeros((rep.shape[0], 0), dtype=np.float32))
    tmp.obsm["rep"] = np.asarray(rep, dtype=np.float32)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=N_NEIGHBORS, random_state=seed)
        for res in RESOLUTIONS:
            sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph",
                         n_iterations=2, directed=False, key_added="c")
            out.append((res, tmp.obs["c"].to_numpy()))
    return out


def score(rep: np.ndarray, truth: np.ndarray, seed: int) -> dict[str, float]:
    """ARI and NMI at the resolution whose cluster count is closest to the number of
    labels (lowest resolution on ties), and the best ARI over the grid."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n_labels = len(np.unique(truth))
    grid = leiden_grid(rep, seed)
    res, labels = min(grid, key=lambda item: abs(len(np.unique(item[1])) - n_labels))
    return {"ari": float(adjusted_rand_score(truth, labels)),
            "nmi": float(normalized_mutual_info_score(truth, labels)),
            "resolution": res, "n_clusters": len(np.unique(labels)),
            "ari_best": max(float(adjusted_rand_score(truth, lab)) for _, lab in grid)}


def pca_rep(adata) -> np.ndarray:
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=50, random_state=0)
    return np.asarray(work.obsm["X_pca"])


def ours(adata, seed: int, epochs: int, device: str, *, bf16: bool = False
         ) -> tuple[np.ndarray, dict[str, Any]]:
    from step.workflows import scModel

    work = adata.copy()
    model = scModel(work, seed=seed, device=device)
    kw = {"amp": "bf16"} if bf16 else {}
    history = model.run(epochs=epochs, verbose=False, **kw)
    config = model.model.config
    return np.asarray(work.obsm["X_rep"]), {"epochs_run": int(len(history)),
                                            "model_config": config}


def scvi_rep(adata, seed: int, epochs: int) -> np.ndarray:
    import scvi

    work = adata.copy()
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(work)
    model = scvi.model.SCVI(work)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return np.asarray(model.get_latent_representation())


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--epochs", type=int,
                        help="training epochs of every model (default 20 with --quick, "
                             "else 100)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also train scModel under bf16 autocast (default: on "
                             "without --quick)")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = not args.quick
    C.setup(args)
    info = C.machine(args)
    epochs = args.epochs or (20 if args.quick else 100)
    seeds = [args.seed + i for i in range(args.seeds)]

    adata = pbmc68k_counts()
    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    per_seed = C.Table("quality_runs", "Every run", [
        C.Column("method", "embedding"),
        C.Column("seed", "seed"),
        C.Column("ari", "ARI", C.fmt_float(3)),
        C.Column("nmi", "NMI", C.fmt_float(3)),
        C.Column("resolution", "Leiden resolution", C.fmt_float(1)),
        C.Column("n_clusters", "clusters"),
        C.Column("ari_best", "best ARI over resolutions", C.fmt_float(3)),
        C.Column("train_s", "train s", C.fmt_float(1)),
    ])
    notes: list[str] = []
    extra: dict[str, Any] = {}
    pca = pca_rep(adata)
    try:
        import scvi  # noqa: F401

        have_scvi = True
    except ImportError:
        have_scvi = False
        notes.append("scVI: not run (scvi-tools is not installed in this environment).")

    with tempfile.TemporaryDirectory(prefix="step-quality-") as tmpdir:
        tmp = Path(tmpdir)
        h5ad = C.write_counts_h5ad(adata, tmp / "pbmc.h5ad")
        for seed in seeds:
            print(f"seed {seed}: step scModel, {epochs} epochs", flush=True)
            t = time.perf_counter()
            rep, meta = ours(adata, seed, epochs, args.device)
            secs = time.perf_counter() - t
            extra["step_model_config"] = meta["model_config"]
            per_seed.add(method="step scModel (X_rep, posterior mean)", seed=seed,
                         train_s=secs, epochs_run=meta["epochs_run"],
                         **score(rep, truth, seed))
            if args.bf16:
                print(f"seed {seed}: step scModel, bf16 autocast", flush=True)
                t = time.perf_counter()
                rep, meta = ours(adata, seed, epochs, args.device, bf16=True)
                per_seed.add(method="step scModel, bf16 autocast", seed=seed,
                             train_s=time.perf_counter() - t,
                             epochs_run=meta["epochs_run"], **score(rep, truth, seed))
            per_seed.add(method="PCA, 50 PCs of log-normalised counts", seed=seed,
                         **score(pca, truth, seed))
            print(f"seed {seed}: step-kit scModel, {epochs} epochs", flush=True)
            try:
                t = time.perf_counter()
                sk = C.run_stepkit(C.with_seed(args, seed), h5ad, "quality",
                                   tmp / f"sk_quality_{seed}.json",
                                   ["--epochs", epochs, "--beta", 0.01])
                secs = time.perf_counter() - t
                names = Path(sk["obs_names"]).read_text().split()
                if list(names) != list(adata.obs_names):
                    msg = "step-kit returned cells in another order"
                    raise RuntimeError(msg)
                for key, label in (("embedding", "X_rep as returned (posterior sample)"),
                                   ("embedding_mean", "posterior mean")):
                    per_seed.add(method=f"step-kit {sk['version']} scModel, {label}",
                                 seed=seed, train_s=secs, epochs_run=sk.get("steps_run"),
                                 **score(np.load(sk[key]), truth, seed))
            except C.StepkitUnavailable as err:
                notes.append(f"step-kit: not run ({err}).")
            if have_scvi:
                print(f"seed {seed}: scVI, {epochs} epochs", flush=True)
                t = time.perf_counter()
                rep = scvi_rep(adata, seed, epochs)
                per_seed.add(method="scVI (latent mean)", seed=seed,
                             train_s=time.perf_counter() - t, **score(rep, truth, seed))

    summary = C.Table("quality", f"Leiden clustering against {LABEL_KEY} (700 PBMCs, "
                      f"{len(np.unique(truth))} labels), mean ± sd over {len(seeds)} seeds", [
        C.Column("method", "embedding"),
        C.Column("ari", "ARI", lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"),
        C.Column("nmi", "NMI", lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"),
        C.Column("n_clusters", "clusters (per seed)"),
        C.Column("ari_best", "best ARI over resolutions", lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"),
        C.Column("train_s", "train s (mean)", C.fmt_float(1)),
    ])
    for method in dict.fromkeys(r["method"] for r in per_seed.rows):
        rows = [r for r in per_seed.rows if r["method"] == method]
        train = [r["train_s"] for r in rows if r.get("train_s") is not None]
        summary.add(method=method, ari=C.mean_sd(r["ari"] for r in rows),
                    nmi=C.mean_sd(r["nmi"] for r in rows),
                    n_clusters=", ".join(str(r["n_clusters"]) for r in rows),
                    ari_best=C.mean_sd(r["ari_best"] for r in rows),
                    train_s=float(np.mean(train)) if train else None)
    config = extra.get("step_model_config", {})
    summary.notes = [
        f"{epochs} epochs requested for both trained models (ours may stop early); "
        "step-kit: hidden 64, 32 modules of size 30, ZINB, 3 layers / 8 heads, KL weight "
        "0.01, batch 128, 20 % validation split.",
        "ours: scModel defaults: " + ", ".join(
            f"{k}={config[k]}" for k in ("hidden_dim", "n_modules", "module_dim", "n_layers",
                                         "n_heads", "likelihood", "kl_weight", "free_bits")
            if k in config) + ".",
        "train s includes step-kit's process start and data loading.",
        *notes,
    ]
    C.write_report("quality", "Embedding quality", C.doc_intro(__doc__)
                   + f"\n\nThreads: {args.threads}.", [summary, per_seed], info, args.out,
                   extra_json=extra)


if __name__ == "__main__":
    main()
