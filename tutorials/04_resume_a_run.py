# %% [markdown]
# # Resume an interrupted run exactly
#
# Long runs get interrupted: a job scheduler sends SIGTERM when the time limit is hit,
# someone presses Ctrl-C, a node goes away. This tutorial shows that a run which is
# stopped halfway and resumed from its checkpoint ends in exactly the same place as a
# run that was never stopped: same weights, same history, same learning rates.
#
# The recipe:
#
# 1. give the `Trainer` a `checkpoint_path` and a `checkpoint_every`;
# 2. after the interruption, build the same model and trainer again (a new process
#    would have to), call `load_checkpoint`, and call the same loop with the same
#    number of epochs. It continues where the checkpoint left off.
#
# Run it with `python tutorials/04_resume_a_run.py --out resume-demo` (add `--quick`
# for a short run on a smaller model).

# %%
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # a script writes figures to files, no window
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

from step.datasets import pbmc68k_counts
from step.functionality.comps.trainer import Trainer, make_loaders, seed_everything
from step.models import TranscriptFormer
from step.utils import ScDataset

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="tutorial-04", help="folder for the outputs")
parser.add_argument("--quick", action="store_true", help="train briefly on a small model")
args, _ = parser.parse_known_args()  # tolerate the extra arguments of a notebook kernel
QUICK = args.quick or os.environ.get("STEP_TUTORIAL_QUICK") == "1"
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)

EPOCHS = 6 if QUICK else 40
STOP_AFTER = EPOCHS // 2  # the "interruption" happens once this many epochs are done
SIZE = (
    {"n_modules": 8, "module_dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2}
    if QUICK
    else {"n_modules": 32, "module_dim": 30, "hidden_dim": 64, "n_layers": 2, "n_heads": 4}
)

# %% [markdown]
# ## Data
#
# The 700 PBMCs that ship with the package, as integer counts. The dataset keeps them
# sparse and gathers each mini-batch by index.

# %%
adata = pbmc68k_counts()
dataset = ScDataset(adata, class_key="bulk_labels")
print(adata)

# %% [markdown]
# ## One function that builds everything
#
# Resuming works in a fresh process, so everything that a run depends on must be
# rebuilt the same way each time: the model (same settings), the trainer (same seed
# and options) and the loaders (same batch size and split seed). Putting that into a
# function is the simplest way to guarantee it.
#
# Dropout is active and the variational model samples its latent code during
# training, so the run consumes random numbers at every step; the checkpoint stores
# the state of every random generator (Python, NumPy, torch) for exactly this reason.


# %%
def build(checkpoint: Path | None = None, callbacks=()):
    seed_everything(0)
    model = TranscriptFormer(dataset.n_genes, dropout=0.2, **SIZE)
    trainer = Trainer(
        model,
        seed=0,
        verbose=False,
        checkpoint_path=checkpoint,
        checkpoint_every=1 if checkpoint else None,
        callbacks=callbacks,
        # keep the run going for all epochs so the comparison covers every one of them
        early_stopping=False,
    )
    trainer.init_optimizer(lr=2e-3)
    trainer.set_lr_scheduler(kind="multistep", gamma=0.5)  # milestones: 1/2 and 3/4 of the run
    loaders = make_loaders(dataset, 128, split_rate=0.2, obs_key="bulk_labels", seed=0)
    return trainer, loaders


# %% [markdown]
# ## The reference: a run that is never interrupted

# %%
reference, loaders = build()
reference.train_batch(EPOCHS, loaders)
shown = ["epoch", "lr_all", "recon_loss", "val_recon_loss"]
print(reference.history[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))

# %% [markdown]
# ## A run that is interrupted
#
# We stop the second run by raising `KeyboardInterrupt` from a callback, which is what
# pressing Ctrl-C does. (A SIGTERM from a scheduler is handled the same way.) The
# trainer catches the interruption, writes its state to `checkpoint_path`, prints why
# it stopped, and lets the exception through so that the program can end.
#
# The interruption comes as the next epoch is about to begin, so the checkpoint holds
# the state at an epoch boundary. A checkpoint written partway through an epoch is
# still useful, but resuming from it repeats that epoch from its start, on weights
# that already took some of its steps, so it does not match the uninterrupted run
# step for step.


# %%
class PressCtrlC:
    """Interrupt training when an epoch is about to start."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, epoch: int) -> None:
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


checkpoint = OUT / "run.pt"
interrupted, loaders = build(checkpoint, callbacks=[PressCtrlC(STOP_AFTER)])
interrupted.verbose = True  # show the message the trainer prints when interrupted
try:
    interrupted.train_batch(EPOCHS, loaders)
except KeyboardInterrupt:
    pass
print(f"epochs done before the interruption: {len(interrupted.history)}")

# %% [markdown]
# ## What the checkpoint holds
#
# The file is written atomically (a crash while writing leaves the previous file
# intact) and holds only tensors and plain containers, so it is read back without
# running any code from it.

# %%
state = torch.load(checkpoint, weights_only=True)
print(sorted(state))
print(state["counters"])

# %% [markdown]
# ## Resume
#
# A new model and trainer, built exactly as before. Loading the checkpoint restores
# the weights, the optimizer and schedule, the early-stopping state, the epoch and
# step counters, the history and the random generators. Calling `train_batch` with the
# same number of epochs runs only the epochs that are left.

# %%
resumed, loaders = build()
torch.manual_seed(12345)  # whatever ran in between must not matter
resumed.load_checkpoint(checkpoint)
print(f"resuming at epoch {resumed.epoch}")
resumed.train_batch(EPOCHS, loaders)

# %% [markdown]
# ## Compare
#
# Every number in the history and every weight must be identical; only the wall-clock
# seconds per epoch differ.

# %%
columns = [c for c in reference.history.columns if c != "seconds"]
a = reference.history[columns]
b = resumed.history[columns]
pd.testing.assert_frame_equal(a, b)
same_weights = all(
    torch.equal(p, q)
    for p, q in zip(reference.model.state_dict().values(), resumed.model.state_dict().values())
)
assert same_weights
both = pd.DataFrame(
    {
        "epoch": a["epoch"],
        "val_total_loss (uninterrupted)": a["val_total_loss"],
        "val_total_loss (resumed)": b["val_total_loss"],
    }
)
print(both.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
print("histories and weights are identical")

# %% [markdown]
# The same comparison as a picture: the validation loss of the uninterrupted run, and
# of the second run before the interruption and after resuming from the checkpoint.

# %%
before = interrupted.history
after = resumed.history[resumed.history["epoch"] >= len(before)]
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(a["epoch"], a["val_total_loss"], lw=6, alpha=0.3, c="grey", label="uninterrupted")
ax.plot(before["epoch"], before["val_total_loss"], "o", label="before the interruption")
ax.plot(after["epoch"], after["val_total_loss"], "s", label="after resuming")
ax.axvline(len(before) - 0.5, ls="--", c="k", lw=0.8)
ax.set_xlabel("epoch")
ax.set_ylabel("val_total_loss")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "resume.png", dpi=120)

# %% [markdown]
# ## Save the results
#
# The history is a pandas DataFrame, so it can be written to CSV (or Parquet) as is.

# %%
resumed.history.to_csv(OUT / "history.csv", index=False)
torch.save(resumed.model.state_dict(), OUT / "model.pt")
print(f"wrote {OUT / 'history.csv'}, {OUT / 'resume.png'} and {OUT / 'model.pt'}")

# %% [markdown]
# ## In a real job
#
# Put the three steps into your training script:
#
# ```python
# trainer, loaders = build(checkpoint=Path("run/last.pt"))
# if Path("run/last.pt").exists():
#     trainer.load_checkpoint("run/last.pt")
# trainer.train_batch(200, loaders)
# ```
#
# and simply start the script again after an interruption. The same works for the
# other loops (`train`, `train_graph_batch`, `train_node_sampler`) and under `torchrun`,
# where only rank 0 writes the file and every rank reads it back.
