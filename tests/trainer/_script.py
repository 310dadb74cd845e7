"""Trains the stand-in model in a separate process (the torchrun test)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from step.functionality.comps.trainer import Trainer, make_loaders, seed_everything  # noqa: E402
from step.functionality.comps.trainer import _checkpoint as ckpt  # noqa: E402
from step.functionality.comps.trainer import TrainingInterrupted  # noqa: E402
from step.utils.dataset import ScDataset  # noqa: E402
from tests.trainer._toy import ToyVAE, toy_counts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ckpt")
    p.add_argument("--resume")
    p.add_argument("--out", required=True)
    p.add_argument("--diverging-rank", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)

    writes = []
    real_write = ckpt.write_checkpoint

    def counting_write(payload, path):
        writes.append(str(path))
        real_write(payload, path)

    ckpt.write_checkpoint = counting_write

    seed_everything(0)
    x = toy_counts(240).numpy()
    adata = ad.AnnData(sp.csr_matrix(x.astype(np.float32)))
    dataset = ScDataset(adata)
    model = ToyVAE(dropout=0.2)

    trainer = Trainer(model, seed=0, verbose=False, checkpoint_path=args.ckpt,
                      checkpoint_every=1 if args.ckpt else None,
                      early_stopping={"recon_loss": (3, 0.0)}, stop_rule="recon_loss",
                      restore_best=False)
    trainer.init_optimizer(lr=1e-2)
    loaders = make_loaders(dataset, args.batch_size, split_rate=0.25, seed=0)

    call_func = None
    rank = int(os.environ.get("RANK", "0"))
    if args.diverging_rank == rank:
        # this rank's validation creeps up every epoch: alone, it would stop after the
        # stopper's patience; averaged with the other rank it still improves
        def call_func(inputs):
            out = trainer.model.loss(inputs)
            if not trainer.model.training:
                out["recon_loss"] = 0.0 * out["recon_loss"] + 100.0 + 0.01 * trainer.epoch
            return out

    if args.resume:
        trainer.load_checkpoint(args.resume)
    try:
        trainer.train_batch(args.epochs, loaders, call_func=call_func)
    except TrainingInterrupted:
        print(trainer.stop_reason, flush=True)
        return 143
    weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    out = {"rank": rank, "weights": weights, "epochs": len(trainer.history),
           "val_recon": trainer.history["val_recon_loss"].tolist(), "writes": writes,
           "world": int(os.environ.get("WORLD_SIZE", "1"))}
    path = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(path, "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
