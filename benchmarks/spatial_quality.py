"""Spatial domain quality on the named benchmark cases (``step.datasets.spatial_benchmark_case``),
every method at its defaults, side by side in one run.

Cases are built from real PBMC cells; their domains share cell types and differ only in
their proportions, with smooth borders, thin layers, uneven domain sizes, hexagonal
(Visium-like) and square (ST) grids, section effects, and raw counts or normalised values
rounded to integers. For every case and seed (the seed draws the data and seeds every
method) each embedding is clustered with k-means into the true number of domains
(``KMeans(n_init=10, random_state=seed)``) and scored by the adjusted Rand index (ARI)
against the true domains:

- PCA: 30 PCs of log-normalised values (``normalize_total`` to 1e4, ``log1p``);
- ours, ``stModel(adata, section_key="section", batch_key="section" on several sections)``
  at its defaults, ``run()`` (two-stage) and ``run(mode="end-to-end")``: ``X_rep``
  (no smoother), ``X_smoothed``, and ``cluster(n, refine=True)`` on ``X_smoothed``
  (k-means labels smoothed by a majority vote over the spatial graph);
- step-kit 0.3's ``stModel`` end to end at the driver's defaults (step-kit's own: 4 GCN
  layers, 10-neighbour graph, 200 iterations of 1,024 sampled nodes, KL weight 1e-3,
  section as batch), posterior mean of its ``X_smoothed``.

Usage::

    python benchmarks/spatial_quality.py --quick --threads 1    # one case, one seed
    python benchmarks/spatial_quality.py --threads 1            # every case, 3 seeds
    # one process per method, then one table with every row:
    python benchmarks/spatial_quality.py --threads 1 --methods two-stage --name ts --out /tmp/r
    python benchmarks/spatial_quality.py --threads 1 --methods pca --merge /tmp/r/ts.json
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

from step.datasets import SPATIAL_BENCHMARK_CASES, spatial_benchmark_case

QUICK_CASES = ("st_rounded",)
METHODS = ("pca", "two-stage", "end-to-end", "step-kit")


def kmeans(rep: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n, n_init=10, random_state=seed).fit_predict(np.asarray(rep, np.float32))


def ari(truth: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, labels))


def pca_rep(adata) -> np.ndarray:
    import scanpy as sc

    work = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
        sc.pp.pca(work, n_comps=30, random_state=0)
    return np.asarray(work.obsm["X_pca"])


def ours(adata, mode: str, seed: int, device: str, precision: str | None = None
         ) -> tuple[dict[str, float], float, int]:
    from step.workflows import stModel
    from step.workflows._cluster import spatial_majority_vote

    work = adata.copy()
    truth = work.obs["domain_true"].to_numpy()
    n = int(work.obs["domain_true"].nunique())
    multi = work.obs["section"].nunique() > 1
    t = time.perf_counter()
    model = stModel(work, section_key="section", batch_key="section" if multi else None,
                    seed=seed, device=device)
    history = model.run(mode=mode, verbose=False,
                        **({"precision": precision} if precision else {}))
    secs = time.perf_counter() - t
    smoothed = kmeans(work.obsm["X_smoothed"], n, seed)
    scores = {"X_rep": ari(truth, kmeans(work.obsm["X_rep"], n, seed)),
              "X_smoothed": ari(truth, smoothed),
              "X_smoothed, refined": ari(truth, spatial_majority_vote(
                  smoothed, model.graph.edge_index))}
    return scores, secs, len(history)


def stepkit(args, h5ad: Path, tmp: Path, truth: np.ndarray, n: int, seed: int,
            multi: bool) -> tuple[dict[str, float], float, str]:
    extra = ["--coords", "spatial", "--warmup-iterations", 2]
    if multi:
        extra += ["--section-key", "section"]
    t = time.perf_counter()
    info = C.run_stepkit(C.with_seed(args, seed), h5ad, "spatial", tmp / f"sk_{seed}.json", extra)
    secs = time.perf_counter() - t
    rep = np.load(info["smoothed_mean"])
    return ({"X_smoothed (posterior mean)": ari(truth, kmeans(rep, n, seed)),
             "unsmoothed (posterior mean)": ari(truth, kmeans(np.load(info["unsmoothed_mean"]),
                                                              n, seed))},
            secs, str(info["version"]))


def summarise(args, runs: C.Table, cases: list[str], seeds: list[int], notes: list[str],
              info: dict[str, Any], *, final: bool) -> None:
    """Write the per-case summary and every run (called after each run, so an interrupted
    benchmark keeps what it measured)."""
    merged_machines = []
    rows_all = list(runs.rows)
    for path in args.merge:
        payload = json.loads(Path(path).read_text())
        merged_machines.append(payload["machine"])
        for table_name, rows in payload["tables"].items():
            if table_name.endswith("_runs"):
                rows_all += [r for r in rows if r["case"] in cases and r["seed"] in seeds]
    seen: set[tuple[str, int, str]] = set()
    unique = []
    for row in rows_all:  # a method measured by several processes counts once
        key = (row["case"], row["seed"], row["method"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    unique.sort(key=lambda r: (cases.index(r["case"]), r["seed"],
                               r["method"] != "PCA (30 PCs)", r["method"]))
    table = C.Table(runs.name, runs.title, runs.columns, unique)

    # seeds of a case for which every method of that case has a result (an interrupted
    # run leaves the later seeds to some methods only); the summary uses these
    common: dict[str, list[int]] = {}
    for case in cases:
        rows = [r for r in unique if r["case"] == case]
        methods = {r["method"] for r in rows}
        common[case] = [s for s in seeds
                        if {r["method"] for r in rows if r["seed"] == s} == methods]
    summary = C.Table(args.name, "Spatial domain ARI per case (k-means, true number of "
                      "domains; mean and sd over the seeds every method completed)", [
        C.Column("case", "case"), C.Column("method", "embedding"),
        C.Column("ari_mean", "ARI mean", C.fmt_float(3)),
        C.Column("ari_sd", "ARI sd", C.fmt_float(3)),
        C.Column("n_seeds", "seeds", C.fmt_int),
        C.Column("seconds", "train s (per seed)", C.fmt_float(0)),
    ])
    overall: dict[str, list[float]] = {}
    for case in cases:
        rows = [r for r in unique if r["case"] == case and r["seed"] in common[case]]
        for method in dict.fromkeys(r["method"] for r in rows):
            values = [r["ari"] for r in rows if r["method"] == method]
            secs = [r["seconds"] for r in rows if r["method"] == method and r.get("seconds")]
            mean, sd = C.mean_sd(values)
            overall.setdefault(method, []).append(mean)
            summary.add(case=case, method=method, ari_mean=mean, ari_sd=sd,
                        n_seeds=len(values), seconds=float(np.mean(secs)) if secs else None,
                        values=values)
    for method, means in overall.items():
        if len(means) == len(cases) and len(cases) > 1:
            summary.add(case="mean over cases", method=method, ari_mean=float(np.mean(means)))
    case_notes = [f"{name}: {SPATIAL_BENCHMARK_CASES[name].description}" for name in cases]
    summary.notes = [*case_notes,
                     "refined: stModel.cluster(n, refine=True), one majority-vote pass over "
                     "the model's spatial graph on the k-means labels of X_smoothed.",
                     *notes]
    if not final:
        summary.notes.append("partial: the benchmark was still running when this was written.")
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads} for both tools; seeds " \
        f"{seeds}."
    if args.merge:
        intro += (f"\n\nRows merged from {len(args.merge)} other run(s) of this script over "
                  "the same cases and seeds on the same machine (where two runs measured "
                  "the same method, case and seed, the first listed counts): "
                  + "; ".join(C.machine_line(m) for m in merged_machines))
    C.write_report(args.name, "Spatial domain quality", intro, [summary, table], info,
                   args.out, extra_json={"merged_from": [str(p) for p in args.merge]})


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--cases", nargs="+", choices=sorted(SPATIAL_BENCHMARK_CASES))
    parser.add_argument("--seeds", type=int, help="seeds per case (default 3; 1 with --quick)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"),
                        help="train our rows in this precision (default: the workflow's, "
                             "fp32); the rows' names say it")
    parser.add_argument("--name", default="spatial_quality",
                        help="base name of the result files (default: spatial_quality)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="JSON results of other runs of this script over the same "
                             "cases and seeds (e.g. one process per method, or an earlier "
                             "run of a method whose code did not change); their rows join "
                             "this run's tables")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence for the summary's notes (e.g. where merged rows "
                             "come from); may be repeated")
    args = parser.parse_args(argv)
    C.setup(args)
    info = C.machine(args)
    cases = args.cases or (list(QUICK_CASES) if args.quick else list(SPATIAL_BENCHMARK_CASES))
    n_seeds = args.seeds or (1 if args.quick else 3)
    seeds = [args.seed + i for i in range(n_seeds)]

    runs = C.Table(f"{args.name}_runs", "Every run", [
        C.Column("case", "case"), C.Column("seed", "seed"), C.Column("method", "embedding"),
        C.Column("ari", "ARI", C.fmt_float(3)), C.Column("seconds", "train s", C.fmt_float(0)),
    ])
    notes: list[str] = list(args.note)
    with tempfile.TemporaryDirectory(prefix="step-spatial-quality-") as tmpdir:
        tmp = Path(tmpdir)
        # every case with one seed before the next seed
        for seed, case in ((s, c) for s in seeds for c in cases):
            adata = spatial_benchmark_case(case, seed)
            truth = adata.obs["domain_true"].to_numpy()
            n = int(adata.obs["domain_true"].nunique())
            multi = adata.obs["section"].nunique() > 1
            if "pca" in args.methods:
                runs.add(case=case, seed=seed, method="PCA (30 PCs)",
                         ari=ari(truth, kmeans(pca_rep(adata), n, seed)))
            for mode in ("two-stage", "end-to-end"):
                if mode not in args.methods:
                    continue
                label = f"{mode} ({args.precision})" if args.precision else mode
                print(f"[{case} seed {seed}] step stModel {label}", flush=True)
                scores, secs, epochs = ours(adata, mode, seed, args.device, args.precision)
                for key, value in scores.items():
                    runs.add(case=case, seed=seed, method=f"step stModel {label}, {key}",
                             ari=value, seconds=secs, epochs_run=epochs)
            if "step-kit" in args.methods:
                print(f"[{case} seed {seed}] step-kit stModel end to end", flush=True)
                h5ad = C.write_counts_h5ad(adata, tmp / f"{case}_{seed}.h5ad")
                try:
                    scores, secs, version = stepkit(args, h5ad, tmp, truth, n, seed, multi)
                except C.StepkitUnavailable as err:
                    if f"step-kit rows skipped: {err}" not in notes:
                        notes.append(f"step-kit rows skipped: {err}")
                    scores = {}
                for key, value in scores.items():
                    runs.add(case=case, seed=seed,
                             method=f"step-kit {version} stModel end to end, {key}",
                             ari=value, seconds=secs)
            summarise(args, runs, cases, seeds, notes, info, final=False)
    summarise(args, runs, cases, seeds, notes, info, final=True)


if __name__ == "__main__":
    main()
