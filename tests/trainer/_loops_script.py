"""Runs one of the four training loops in a separate process (resume, kill and torchrun tests).

The run has validation, early stopping, a decaying schedule, KL warm-up and the
convergence probe on. ``--kill-epoch K`` makes the process deliver ``--kill-signal`` to
itself after the first step of epoch K, as an outside kill in the middle of an epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from step.functionality.comps.trainer import (  # noqa: E402
    ConvergenceProbe,
    FullMatrixSource,
    GraphBatchSource,
    MiniBatchSource,
    Trainer,
    TrainingInterrupted,
    make_loaders,
    seed_everything,
)
from step.functionality.comps.trainer.sources import Shard  # noqa: E402
from step.graph import NeighborSampler, build_spatial_graph, section_graphs  # noqa: E402
from step.utils.dataset import ScDataset  # noqa: E402
from tests.trainer._toy import ToyVAE, toy_counts  # noqa: E402

N_CELLS = 240


class Killer:
    """Deliver a signal to this process after the first step of one epoch."""

    def __init__(self, epoch: int, sig: str) -> None:
        self.epoch, self.sig = epoch, sig

    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.epoch == self.epoch:
            os.kill(os.getpid(), getattr(signal, f"SIG{self.sig}"))


class Coverage:
    """Which items each step of the first epoch covered."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, batch) -> None:
        if trainer.epoch == 0 and batch.ids is not None:
            self.ids.extend(int(i) for i in np.asarray(batch.ids).reshape(-1))


def build(loop: str, seeded_split: bool):
    x = toy_counts(N_CELLS).numpy()
    dataset = ScDataset(ad.AnnData(sp.csr_matrix(x.astype(np.float32))))
    rng = np.random.default_rng(0)
    valid_ind = np.sort(rng.choice(N_CELLS, N_CELLS // 5, replace=False))
    train_ind = np.setdiff1d(np.arange(N_CELLS), valid_ind)
    if loop == "full":
        return dataset, (torch.from_numpy(x), train_ind, valid_ind), train_ind
    if loop == "mini":
        loaders = make_loaders(dataset, 16, split_rate=0.2, seed=0 if seeded_split else None)
        return dataset, (loaders,), np.arange(len(loaders[0].dataset))
    coords = rng.uniform(0, 20, size=(N_CELLS, 2))
    sections = np.repeat(np.arange(4), N_CELLS // 4)
    edge_index = build_spatial_graph(coords, sections, k=5)
    if loop == "graph":
        from torch_geometric.loader import DataLoader as GraphLoader

        graphs = GraphLoader(section_graphs(edge_index, sections), batch_size=1, shuffle=True)
        return dataset, (graphs, dataset, train_ind, valid_ind), train_ind
    sampler = NeighborSampler(edge_index, N_CELLS, num_neighbors=(4, 3), batch_size=24,
                              seed=3 if seeded_split else None,
                              input_nodes=torch.from_numpy(train_ind))
    valid = NeighborSampler(edge_index, N_CELLS, num_neighbors=(4, 3), batch_size=16,
                            shuffle=False, input_nodes=torch.from_numpy(valid_ind))
    return dataset, (sampler, dataset, train_ind, valid_ind), train_ind, valid, 4


def validation_both_ways(trainer: Trainer, loop: str, loop_args: tuple, built: tuple
                         ) -> tuple[dict, dict]:
    """Validation means from this process's shard (all-reduced) and from every batch."""
    if loop == "full":
        X, _, valid_ind = loop_args
        sharded = trainer.validate_X(X, valid_ind)
        source = FullMatrixSource(X, valid_ind, valid_ind)
    elif loop == "mini":
        valid = loop_args[0][1]
        sharded = trainer.validate_loader(valid)
        source = MiniBatchSource((valid, valid))
    else:
        graphs = loop_args[0] if loop == "graph" else built[3]
        dataset, valid_ind = loop_args[1], loop_args[3]
        if hasattr(graphs, "set_epoch"):
            graphs.set_epoch(0)  # both evaluations see the same sampled neighbourhoods
        sharded = trainer.validate_gloader(graphs, dataset, valid_ind)
        if hasattr(graphs, "set_epoch"):
            graphs.set_epoch(0)
        source = GraphBatchSource(graphs, dataset, None, valid_ind, evaluate_only=True)
    source.bind(trainer.plan, Shard())  # every process evaluates every batch
    return sharded, trainer.evaluator.run(source.validation_batches())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--loop", choices=("full", "mini", "graph", "sampler"), required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--ckpt")
    p.add_argument("--resume")
    p.add_argument("--out", required=True)
    p.add_argument("--kill-epoch", type=int, default=-1)
    p.add_argument("--kill-signal", default="KILL")
    p.add_argument("--unseeded", action="store_true", help="no seeds anywhere (torchrun)")
    p.add_argument("--split-first", action="store_true",
                   help="draw the split before the trainer joins the process group")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if not args.unseeded:
        seed_everything(0)
    else:
        seed_everything(100 + rank)  # every process draws differently unless shared

    built = build(args.loop, seeded_split=not args.unseeded) if args.split_first else None
    coverage = Coverage()
    callbacks: list = [coverage]
    if args.kill_epoch >= 0:
        callbacks.append(Killer(args.kill_epoch, args.kill_signal))
    stopping = {"recon_loss": (3, 1e-3)} if not args.unseeded else {"total_loss": (2, 0.3)}
    trainer = Trainer(ToyVAE(dropout=0.2), seed=None if args.unseeded else 0, verbose=False,
                      checkpoint_path=args.ckpt, checkpoint_every=1 if args.ckpt else None,
                      callbacks=callbacks, early_stopping=stopping,
                      stop_rule="total_loss" if args.unseeded else "all",
                      kl_warmup_epochs=4)
    # the trainer joins the process group first, so that a split drawn without a seed is
    # drawn once and shared
    built = built or build(args.loop, seeded_split=not args.unseeded)
    dataset, loop_args, train_items = built[:3]
    probe = ConvergenceProbe(dataset, every=2, threshold=0.999, patience=10, n_clusters=3)
    trainer.callbacks.insert(0, probe)
    trainer.init_optimizer(lr=1e-2)
    trainer.set_lr_scheduler(milestones=[3, 5], gamma=0.5)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    messages: list[str] = []
    trainer.trace_func = messages.append
    trainer.verbose = True
    try:
        if args.loop == "full":
            stopped = trainer.train(args.epochs, *loop_args)
        elif args.loop == "mini":
            stopped = trainer.train_batch(args.epochs, *loop_args)
        elif args.loop == "graph":
            stopped = trainer.train_graph_batch(args.epochs, *loop_args)
        else:
            valid, every = built[3], built[4]
            stopped = trainer.train_node_sampler(args.epochs, *loop_args, valid_loader=valid,
                                                 valid_every=every)
    except TrainingInterrupted:
        print(trainer.stop_reason, flush=True)
        return 143
    except KeyboardInterrupt:
        print(trainer.stop_reason, flush=True)
        return 130
    history = trainer.history.drop(columns=["seconds"]).to_dict("records")
    sharded, whole = validation_both_ways(trainer, args.loop, loop_args, built)
    out = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
           "weights": {k: v.tolist() for k, v in trainer.model.state_dict().items()},
           "history": history, "steps": trainer.step_history, "stopped": bool(stopped),
           "stop_reason": trainer.stop_reason, "messages": messages,
           "probe": probe.aris, "coverage": coverage.ids,
           "val_sharded": sharded, "val_whole": whole,
           "train_items": [int(i) for i in train_items]}
    path = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(path, "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
