#!/usr/bin/env python
"""Benchmark driver for scVI (``scvi-tools``), run in its own environment.

scvi-tools pins its own versions of lightning, anndata and scanpy, so it lives in a separate
virtual environment (default ``$HOME/.cache/step-peers/scvi``, created as described in
``benchmarks/README.md``) and never imports this repository's package.

Input: a ``.h5ad`` file whose ``X`` holds integer counts. The driver trains the default
``scvi.model.SCVI`` (10 latent dimensions, 128 hidden units, ZINB) for ``--epochs`` epochs
on the CPU and writes the latent posterior means (``get_latent_representation()``) as
``.npy`` beside ``--out``, the cell names as ``.txt`` and a JSON summary as ``--out``.

Example::

    ~/.cache/step-peers/scvi/bin/python benchmarks/peers/scvi_driver.py \
        /tmp/pbmc_counts.h5ad --epochs 30 --seed 0 --out /tmp/scvi.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path


def _without_checkout_paths() -> None:
    """Drop source folders holding a ``step`` package from ``sys.path``."""
    def shadows(entry: str) -> bool:
        path = os.path.abspath(entry or os.getcwd())
        return "site-packages" not in path and os.path.isdir(os.path.join(path, "step"))

    sys.path[:] = [p for p in sys.path if not shadows(p)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("h5ad", help=".h5ad file with integer counts in X")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", required=True, help="result .json; the .npy goes beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _without_checkout_paths()
    warnings.filterwarnings("ignore")
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.h5ad)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, accelerator="cpu", devices=1,
                enable_progress_bar=False)
    train_seconds = time.perf_counter() - t0
    out = Path(args.out)
    prefix = out.with_suffix("")
    latent = np.asarray(model.get_latent_representation(), dtype=np.float32)
    np.save(f"{prefix}_latent.npy", latent)
    names = Path(f"{prefix}_obs_names.txt")
    names.write_text("\n".join(map(str, adata.obs_names)) + "\n")
    info = {"tool": "scvi-tools", "version": scvi.__version__, "torch": torch.__version__,
            "seed": args.seed, "epochs": args.epochs, "threads": torch.get_num_threads(),
            "n_latent": int(latent.shape[1]), "train_seconds": train_seconds,
            "embedding": f"{prefix}_latent.npy", "obs_names": str(names)}
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
