"""Cell-type structure of single-cell embeddings on the PBMC counts, at fixed Leiden settings.

Embeddings of the 700 PBMCs shipped with the package (765 genes) are clustered with one
fixed procedure and compared with the ``bulk_labels`` annotation (10 cell types) by the
adjusted Rand index (ARI) and normalised mutual information (NMI):

- ``step``: the ``step.workflows.scModel`` workflow at its defaults, as users call it
  (``scModel(adata, seed=s).run()``: default model, epochs and training settings, 20 %
  validation split, early stopping), ``obsm["X_rep"]`` (posterior means);
- PCA: 50 principal components of ``log1p(counts / total × 1e4)`` (scanpy);
- step-kit 0.3: ``scModel(...).run()`` through ``benchmarks/peers/stepkit_driver.py``
  (hidden 64, 32 modules of size 30, ZINB, KL weight 0.01, 100 epochs): its ``X_rep``
  as returned (a posterior sample) and its posterior mean;
- scVI: the default ``scvi.model.SCVI`` trained for 30 epochs through
  ``benchmarks/peers/scvi_driver.py`` in its own environment, latent means;
- ``step`` under bf16 autocast (full mode), to check that the faster path keeps the
  embedding quality; with ``--methods ... fp32``, also ``step`` in full precision
  (``precision="fp32"``), for machines where the workflow's ``"auto"`` default is bf16.

Clustering (the same for every embedding, ``benchmarks/_leiden_protocol.py``): scanpy's
kNN graph (15 neighbours) on the embedding, then Leiden (igraph flavour, 2 iterations)
at resolution 0.5, at resolution 1.0, and at the resolution that gives 10 clusters
(found by bisection on the cluster count alone, never on the labels; when no resolution
gives exactly 10 the closest count is kept and the run is marked). The best ARI over a
scan of resolutions 0.1, 0.2, ..., 2.0 is shown for reference: it picks the resolution
with the labels, so it is an upper bound, not a result a user gets. Every method runs
with 3 seeds (training and clustering); mean ± sd.

Usage::

    python benchmarks/quality.py --quick        # 1 seed, no bf16 row
    python benchmarks/quality.py                # 3 seeds
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import _leiden_protocol as P
import numpy as np

from step.datasets import pbmc68k_counts

LABEL_KEY = "bulk_labels"
STEPKIT_EPOCHS = 100
SCVI_EPOCHS = 30
METHODS = ("ours", "fp32", "bf16", "pca", "stepkit", "scvi")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "fp32")
DEFAULT_SCVI_PYTHON = Path(os.environ.get("SCVI_PYTHON", C.DEFAULT_SCVI_PYTHON))


def pca_rep(adata) -> np.ndarray:
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=50, random_state=0)
    return np.asarray(work.obsm["X_pca"])


def ours(adata, seed: int, device: str, *, epochs: int | None = None,
         precision: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``X_rep`` of ``scModel`` at its defaults (``epochs`` and ``precision`` only when
    given)."""
    from step.workflows import scModel

    work = adata.copy()
    model = scModel(work, seed=seed, device=device)
    kw: dict[str, Any] = {"precision": precision} if precision else {}
    if epochs is not None:
        kw["epochs"] = epochs
    history = model.run(verbose=False, **kw)
    return np.asarray(work.obsm["X_rep"]), {"epochs_run": int(len(history)),
                                            "model_config": model.model.config}


def _mean_sd(values: list[float]) -> str:
    mean, sd = C.mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}"


def per_run_table() -> C.Table:
    cols = [C.Column("method", "embedding"), C.Column("seed", "seed")]
    for key, label in P.RULES:
        cols += [C.Column(f"ari_{key}", f"ARI, {label}", C.fmt_float(3)),
                 C.Column(f"nmi_{key}", f"NMI, {label}", C.fmt_float(3))]
    cols += [C.Column("n_clusters_r05", "clusters at 0.5"),
             C.Column("n_clusters_r10", "clusters at 1.0"),
             C.Column("res_k", "resolution for 10", C.fmt_float(3)),
             C.Column("exact_k", "exactly 10"),
             C.Column("ari_best", "best ARI of scan", C.fmt_float(3)),
             C.Column("res_best", "at", C.fmt_float(1)),
             C.Column("epochs_run", "epochs run"),
             C.Column("train_s", "train s", C.fmt_float(1))]
    return C.Table("quality_runs", "Every run", cols)


def summary_table(per_run: C.Table, n_labels: int, n_seeds: int) -> C.Table:
    cols = [C.Column("method", "embedding"), C.Column("seeds", "seeds")]
    for key, label in P.RULES:
        cols += [C.Column(f"ari_{key}", f"ARI, {label}"), C.Column(f"nmi_{key}", f"NMI, {label}")]
    cols += [C.Column("ari_best", "best ARI of scan (reference)"),
             C.Column("train_s", "train s (mean)", C.fmt_float(1))]
    table = C.Table("quality", f"Leiden clustering against {LABEL_KEY} (700 PBMCs, {n_labels} "
                    f"labels), mean ± sd over the seeds each method completed (of {n_seeds})", cols)
    for method in dict.fromkeys(r["method"] for r in per_run.rows):
        rows = [r for r in per_run.rows if r["method"] == method]
        train = [r["train_s"] for r in rows if r.get("train_s") is not None]
        metrics = {f"{m}_{key}": _mean_sd([r[f"{m}_{key}"] for r in rows])
                   for key, _ in P.RULES for m in ("ari", "nmi")}
        table.add(method=method, seeds=", ".join(str(r["seed"]) for r in rows), ari_best=_mean_sd([r["ari_best"] for r in rows]),
                  train_s=float(np.mean(train)) if train else None, **metrics)
    return table


def peer_rows(args, seed: int, h5ad: Path, tmp: Path, adata, truth, per_run: C.Table,
              notes: list[str]) -> None:
    """step-kit and scVI rows of one seed (a missing environment becomes a note)."""
    if "stepkit" in args.methods:
        stepkit_rows(args, seed, h5ad, tmp, adata, truth, per_run, notes)
    if "scvi" not in args.methods:
        return
    if args.no_scvi:
        _note(notes, "scVI: skipped (--no-scvi).")
        return
    print(f"seed {seed}: scVI, {SCVI_EPOCHS} epochs", flush=True)
    try:
        t = time.perf_counter()
        sv = C.run_scvi(args.scvi_python, h5ad, tmp / f"scvi_{seed}.json", epochs=SCVI_EPOCHS,
                        seed=seed, threads=args.threads)
        secs = time.perf_counter() - t
        _check_order(Path(sv["obs_names"]), adata, "scVI")
        per_run.add(method=f"scVI {sv['version']} (latent mean, {SCVI_EPOCHS} epochs)",
                    seed=seed, train_s=secs, epochs_run=SCVI_EPOCHS,
                    **P.score(np.load(sv["embedding"]), truth, seed))
    except C.ScviUnavailable as err:
        _note(notes, f"scVI: not run ({err}).")


def stepkit_rows(args, seed: int, h5ad: Path, tmp: Path, adata, truth, per_run: C.Table,
                 notes: list[str]) -> None:
    print(f"seed {seed}: step-kit scModel, {STEPKIT_EPOCHS} epochs", flush=True)
    try:
        t = time.perf_counter()
        sk = C.run_stepkit(C.with_seed(args, seed), h5ad, "quality",
                           tmp / f"sk_quality_{seed}.json",
                           ["--epochs", STEPKIT_EPOCHS, "--beta", 0.01])
        secs = time.perf_counter() - t
        _check_order(Path(sk["obs_names"]), adata, "step-kit")
        for key, label in (("embedding", "X_rep as returned (posterior sample)"),
                           ("embedding_mean", "posterior mean")):
            per_run.add(method=f"step-kit {sk['version']} scModel, {label}", seed=seed,
                        train_s=secs, epochs_run=sk.get("epochs_requested"),
                        **P.score(np.load(sk[key]), truth, seed))
    except C.StepkitUnavailable as err:
        _note(notes, f"step-kit: not run ({err}).")


def _check_order(path: Path, adata, who: str) -> None:
    if path.read_text().split() != list(adata.obs_names):
        msg = f"{who} returned cells in another order"
        raise RuntimeError(msg)


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--epochs", type=int,
                        help="epochs of our model (default: the workflow's default)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 1 with --quick, "
                        "else 3)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also train scModel under bf16 autocast (default: on "
                             "without --quick)")
    parser.add_argument("--scvi-python", type=Path, default=DEFAULT_SCVI_PYTHON,
                        help="python of the separate scVI environment (default: "
                             "$SCVI_PYTHON or ~/.cache/step-peers/scvi)")
    parser.add_argument("--no-scvi", action="store_true", help="skip the scVI rows")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="what to run here (none: only merge --merge files; fp32 only "
                             "when named)")
    parser.add_argument("--name", default="quality",
                        help="base name of the result files (default: quality)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="JSON results of runs of this script with the same seeds, "
                             "measured at the same time (e.g. one process for the peers); "
                             "their rows join this run's tables")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = not args.quick
    C.setup(args)
    info = C.machine(args)
    seeds = [args.seed + i for i in range(args.seeds or (1 if args.quick else 3))]

    adata = pbmc68k_counts()
    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    per_run = per_run_table()
    notes: list[str] = []
    extra: dict[str, Any] = {}
    pca = pca_rep(adata) if "pca" in args.methods else None
    with tempfile.TemporaryDirectory(prefix="step-quality-") as tmpdir:
        tmp = Path(tmpdir)
        h5ad = C.write_counts_h5ad(adata, tmp / "pbmc.h5ad")
        for seed in seeds:
            variants = [("step scModel (X_rep, posterior mean)", None)] \
                if "ours" in args.methods else []
            if "fp32" in args.methods:
                variants.append(("step scModel, fp32", "fp32"))
            if args.bf16 and "bf16" in args.methods:
                variants.append(("step scModel, bf16 autocast", "bf16"))
            for label, precision in variants:
                print(f"seed {seed}: {label}", flush=True)
                t = time.perf_counter()
                rep, meta = ours(adata, seed, args.device, epochs=args.epochs,
                                 precision=precision)
                secs = time.perf_counter() - t
                extra["step_model_config"] = meta["model_config"]
                per_run.add(method=label, seed=seed, train_s=secs,
                            epochs_run=meta["epochs_run"], **P.score(rep, truth, seed))
            if "pca" in args.methods:
                per_run.add(method="PCA, 50 PCs of log-normalised counts", seed=seed,
                            **P.score(pca, truth, seed))
            peer_rows(args, seed, h5ad, tmp, adata, truth, per_run, notes)

            report(args, info, per_run, extra, notes, truth, seeds, done=seed)
    report(args, info, per_run, extra, notes, truth, seeds, done=None)


def report(args, info: dict[str, Any], runs: C.Table, extra: dict[str, Any], notes: list[str],
           truth: np.ndarray, seeds: list[int], *, done: int | None) -> None:
    """Write the tables (called after every seed, so an interrupted run keeps what it
    measured; ``done`` is the last finished seed, ``None`` at the end)."""
    per_run = C.Table(runs.name, runs.title, runs.columns, list(runs.rows))
    notes = list(notes)
    if done is not None:
        notes.append(f"partial: written after seed {done}; the run was still going.")
    merged_machines = []
    for path in args.merge:
        payload = json.loads(Path(path).read_text())
        merged_machines.append(payload["machine"])
        extra = {"step_model_config": payload.get("step_model_config"), **extra}
        notes += [n for n in payload.get("notes", []) if n not in notes]
        per_run.rows += [r for r in payload["tables"]["quality_runs"] if r["seed"] in seeds]
    order = ["step scModel (X_rep", "step scModel, fp32", "step scModel, bf16", "PCA",
             "step-kit", "scVI"]
    per_run.rows.sort(key=lambda r: (r["seed"], next(i for i, p in enumerate(order)
                                                     if r["method"].startswith(p))))
    summary = summary_table(per_run, len(np.unique(truth)),
                            len({r['seed'] for r in per_run.rows}))
    config = extra.get("step_model_config") or {}
    inexact = sorted({r["method"] for r in per_run.rows if not r["exact_k"]})
    ours_note = [] if not config else [
        "ours: scModel defaults: " + ", ".join(
            f"{k}={config[k]}" for k in ("hidden_dim", "n_modules", "module_dim", "latent_dim",
                                         "n_layers", "n_heads", "dropout", "likelihood",
                                         "kl_weight", "free_bits") if k in config)
        + (f"; epochs={args.epochs}." if args.epochs else "; default epochs.")]
    summary.notes = [
        *ours_note,
        f"step-kit: hidden 64, 32 modules of size 30, ZINB, 3 layers / 8 heads, KL weight "
        f"0.01, batch 128, 20 % validation split, {STEPKIT_EPOCHS} epochs.",
        f"scVI: default SCVI (10 latent dimensions), {SCVI_EPOCHS} epochs.",
        "10 clusters: resolution by bisection on the cluster count; "
        + ("every run found exactly 10." if not inexact else
           "no resolution gave exactly 10 for some runs of " + ", ".join(inexact)
           + " (closest count kept)."),
        "best ARI of scan: resolution chosen with the labels (upper bound, not a headline).",
        "train s includes the peers' process start and data loading.",
        *notes,
    ]
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    if args.merge:
        intro += (f"\n\nRows merged from {len(args.merge)} other process(es) run at the "
                  "same time on the same machine: "
                  + "; ".join(C.machine_line(m) for m in merged_machines))
    C.write_report(args.name, "Embedding quality", intro, [summary, per_run], info, args.out,
                   extra_json={**extra, "notes": notes, "methods": args.methods,
                               "merged_from": [str(p) for p in args.merge]})


if __name__ == "__main__":
    main()
