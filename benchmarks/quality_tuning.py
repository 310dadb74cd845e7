"""One-factor-at-a-time experiments on the ``scModel`` defaults (PBMC, fixed Leiden protocol).

Each named configuration changes one or two settings of
``scModel(adata, seed=s, **model).run(epochs=..., **run)``, starting from the settings
before the screen (``BEFORE_TUNING``: 64 latent dimensions, zero-inflated negative
binomial), and is scored with the protocol of ``benchmarks/_leiden_protocol.py`` (ARI at
Leiden resolution 0.5, at 1.0 and at the resolution giving 10 clusters). Every run
is appended to a JSON-lines file as it finishes, so several processes can share the work;
``--table`` turns that file into the mean-of-seeds table of
``benchmarks/results/quality_tuning.md``.

Usage::

    python benchmarks/quality_tuning.py baseline kl_0.01 --seeds 0 1 2
    python benchmarks/quality_tuning.py --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNS_FILE = Path(__file__).parent / "results" / "quality_tuning_runs.jsonl"

#: The scModel settings before this screen; every configuration starts from them, so that
#: the rows keep their meaning whatever the current defaults are (the screen led to
#: ``latent_dim=16, likelihood="nb"``, the configuration ``nb_latent_16``, and then to
#: ``dropout=0``, the configuration ``nb_latent_16_dropout_0``).
BEFORE_TUNING: dict[str, Any] = {"latent_dim": 64, "likelihood": "zinb", "dropout": 0.1}

#: The settings the first part of the screen chose (``nb_latent_16``).
_NB16: dict[str, Any] = {"likelihood": "nb", "latent_dim": 16}

#: name -> (model keyword arguments over BEFORE_TUNING, run keyword arguments, what it tests)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "baseline": ({}, {}, "defaults before tuning"),
    "kl_0.01": ({"kl_weight": 0.01}, {}, "KL weight 0.01"),
    "kl_0.03": ({"kl_weight": 0.03}, {}, "KL weight 0.03"),
    "kl_0.3": ({"kl_weight": 0.3}, {}, "KL weight 0.3"),
    "free_bits_0.1": ({"free_bits": 0.1}, {}, "free bits 0.1 nats per dimension"),
    "latent_16": ({"latent_dim": 16}, {}, "latent size 16"),
    "latent_32": ({"latent_dim": 32}, {}, "latent size 32"),
    "latent_8": ({"latent_dim": 8}, {}, "latent size 8"),
    "latent_16_lr_3e-4": ({"latent_dim": 16}, {"lr": 3e-4},
                          "latent size 16 and learning rate 3e-4"),
    "latent_16_epochs_200": ({"latent_dim": 16}, {"epochs": 200},
                             "latent size 16 and 200 epochs"),
    "modules_64x16": ({"n_modules": 64, "module_dim": 16}, {}, "64 modules of size 16"),
    "nb": ({"likelihood": "nb"}, {}, "negative binomial likelihood (no zero inflation)"),
    "nb_latent_16": ({"likelihood": "nb", "latent_dim": 16}, {},
                     "negative binomial likelihood and latent size 16"),
    "nb_latent_8": ({"likelihood": "nb", "latent_dim": 8}, {},
                    "negative binomial likelihood and latent size 8"),
    "nb_latent_32": ({"likelihood": "nb", "latent_dim": 32}, {},
                     "negative binomial likelihood and latent size 32"),
    "nb_latent_16_epochs_200": ({"likelihood": "nb", "latent_dim": 16}, {"epochs": 200},
                                "negative binomial likelihood, latent size 16, 200 epochs"),
    "log1p_raw": ({"library_log_input": False}, {}, "encoder reads log1p(x), no library norm"),
    "epochs_30": ({}, {"epochs": 30}, "30 epochs"),
    "epochs_50": ({}, {"epochs": 50}, "50 epochs"),
    "epochs_400": ({}, {"epochs": 400}, "400 epochs (data-size rule for 700 cells)"),
    "batch_64": ({}, {"batch_size": 64}, "batch 64 (twice the steps per epoch)"),
    "lr_3e-3": ({}, {"lr": 3e-3}, "learning rate 3e-3"),
    "lr_3e-4": ({}, {"lr": 3e-4}, "learning rate 3e-4"),
    "latent_32_lr_3e-4": ({"latent_dim": 32}, {"lr": 3e-4},
                          "latent size 32 and learning rate 3e-4"),
    "dropout_0": ({"dropout": 0.0}, {}, "no dropout"),
    "nb_latent_16_dropout_0.1": ({**_NB16, "dropout": 0.1}, {},
                                 "negative binomial, latent size 16, dropout 0.1 "
                                 "(nb_latent_16 again, with the participation ratio)"),
    "nb_latent_16_dropout_0": ({**_NB16, "dropout": 0.0}, {},
                               "negative binomial, latent size 16, no dropout"),
    "nb_latent_16_dropout_0_kl_0.3": ({**_NB16, "dropout": 0.0, "kl_weight": 0.3}, {},
                                      "negative binomial, latent size 16, no dropout, "
                                      "KL weight 0.3"),
    "nb_latent_32_dropout_0": ({**_NB16, "latent_dim": 32, "dropout": 0.0}, {},
                               "negative binomial, latent size 32, no dropout"),
    "nb_latent_16_dropout_0_epochs_200": ({**_NB16, "dropout": 0.0}, {"epochs": 200},
                                          "negative binomial, latent size 16, no dropout, "
                                          "200 epochs"),
}

#: The scModel defaults the fourth screen chose (``nb_latent_16_dropout_0``); the
#: ``defaults_*`` rows change one setting from them.
_DEFAULTS: dict[str, Any] = {**_NB16, "dropout": 0.0}
CONFIGS.update({
    "defaults_kl_0.03": ({**_DEFAULTS, "kl_weight": 0.03}, {}, "current defaults, KL weight 0.03"),
    "defaults_kl_0.2": ({**_DEFAULTS, "kl_weight": 0.2}, {}, "current defaults, KL weight 0.2"),
    "defaults_free_bits_0.5": ({**_DEFAULTS, "free_bits": 0.5}, {},
                               "current defaults, free bits 0.5 nats per dimension"),
    "defaults_latent_10": ({**_DEFAULTS, "latent_dim": 10}, {},
                           "current defaults, latent size 10"),
    "defaults_layers_1": ({**_DEFAULTS, "n_layers": 1}, {}, "current defaults, 1 layer"),
    "defaults_layers_3": ({**_DEFAULTS, "n_layers": 3}, {}, "current defaults, 3 layers"),
    "defaults_lr_5e-4": (_DEFAULTS, {"lr": 5e-4}, "current defaults, learning rate 5e-4"),
    "defaults_lr_2e-3": (_DEFAULTS, {"lr": 2e-3}, "current defaults, learning rate 2e-3"),
    "defaults_epochs_150": (_DEFAULTS, {"epochs": 150}, "current defaults, 150 epochs"),
    "defaults_batch_256": (_DEFAULTS, {"batch_size": 256},
                           "current defaults, batch 256 (half the steps)"),
    "defaults_no_split": (_DEFAULTS, {"split_rate": 0.0},
                          "current defaults, no validation split (no early stopping)"),
    "defaults_hidden_128": ({**_DEFAULTS, "hidden_dim": 128}, {},
                            "current defaults, transformer width 128"),
    "defaults_hidden_32": ({**_DEFAULTS, "hidden_dim": 32}, {},
                           "current defaults, transformer width 32"),
    "defaults_modules_64x16": ({**_DEFAULTS, "n_modules": 64, "module_dim": 16}, {},
                               "current defaults, 64 gene modules of size 16"),
    "defaults_modules_16": ({**_DEFAULTS, "n_modules": 16}, {},
                            "current defaults, 16 gene modules"),
    "defaults_decoder_128": ({**_DEFAULTS, "decoder_hidden_dim": 128}, {},
                             "current defaults, decoder width 128"),
    "defaults_heads_8": ({**_DEFAULTS, "n_heads": 8}, {},
                         "current defaults, 8 attention heads"),
})


def embed(config: str, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Train one configuration and return ``X_rep`` with a few training facts."""
    from step.datasets import pbmc68k_counts
    from step.workflows import scModel

    model_kw, run_kw, _ = CONFIGS[config]
    adata = pbmc68k_counts()
    model = scModel(adata, seed=seed, **{**BEFORE_TUNING, **model_kw})
    run_kw = {"epochs": 100, **run_kw}
    history = model.run(verbose=False, **run_kw)
    rep = np.asarray(adata.obsm["X_rep"])
    var = np.sort(rep.var(0))[::-1]
    return rep, {"epochs_run": len(history),
                 "active_dims": int((var > 0.01 * var[0]).sum()),
                 "top3_var_share": float(var[:3].sum() / var.sum()),
                 "participation_ratio": participation_ratio(rep)}


def participation_ratio(rep: np.ndarray) -> float:
    """How many directions the embedding's variance is spread over: ``(sum l)^2 / sum l^2``
    of the eigenvalues ``l`` of its covariance (1: a line; the dimension: isotropic)."""
    centred = rep - rep.mean(0)
    eig = np.linalg.svd(centred, compute_uv=False) ** 2
    return float(eig.sum() ** 2 / (eig ** 2).sum())


def run(configs: list[str], seeds: list[int], out: Path, reps: Path | None) -> None:
    import _leiden_protocol as P

    from step.datasets import pbmc68k_counts

    truth = pbmc68k_counts().obs["bulk_labels"].astype(str).to_numpy()
    for config in configs:
        for seed in seeds:
            t = time.perf_counter()
            rep, facts = embed(config, seed)
            secs = time.perf_counter() - t
            if reps is not None:
                reps.mkdir(parents=True, exist_ok=True)
                np.save(reps / f"{config}_{seed}.npy", rep)
            row = {"config": config, "seed": seed, "train_s": secs, **facts,
                   **P.score(rep, truth, seed, grid=False)}
            print(json.dumps(row), flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


def table(runs: Path) -> str:
    """Markdown table of the runs file: one row per configuration, means over its seeds."""
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    lines = ["| configuration | what it tests | seeds | ARI, res 0.5 | ARI, res 1.0 | "
             "ARI, 10 clusters | clusters at 0.5 / 1.0 | epochs run |",
             "|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        seeds = sorted({r["seed"] for r in mine})

        def mean(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return float(np.mean([r[key] for r in rows]))

        what = CONFIGS[config][2] if config in CONFIGS else config
        lines.append(
            f"| {config} | {what} | {', '.join(map(str, seeds))} | {mean('ari_r05'):.3f} | "
            f"{mean('ari_r10'):.3f} | {mean('ari_k'):.3f} | {mean('n_clusters_r05'):.1f} / "
            f"{mean('n_clusters_r10'):.1f} | {mean('epochs_run'):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RUNS_FILE)
    parser.add_argument("--table", action="store_true",
                        help="print the mean-of-seeds table of --out and stop")
    parser.add_argument("--reps", type=Path, help="folder for the embeddings (.npy)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if args.table:
        print(table(args.out))
        return
    import torch

    torch.set_num_threads(1)
    run(args.configs, args.seeds, args.out, args.reps)


if __name__ == "__main__":
    main()
