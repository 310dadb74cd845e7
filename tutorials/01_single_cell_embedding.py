# %% [markdown]
# # Embed single cells
#
# This tutorial trains TranscriptFormer on 700 peripheral blood mononuclear cells
# (PBMCs), clusters the learned embedding, and compares the clusters with the cell
# types the cells were annotated with. Along the way it looks at the training history,
# saves the trained model, and loads it back.
#
# Run it with `python tutorials/01_single_cell_embedding.py --out tutorial-01`; add
# `--quick` for a short run on a small model (a first look, or a test).

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
import numpy as np
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from step.datasets import pbmc68k_counts
from step.workflows import scModel

parser = argparse.ArgumentParser(description="Embed the bundled PBMCs with TranscriptFormer.")
parser.add_argument("--out", default="tutorial-01", help="folder for the outputs")
parser.add_argument("--quick", action="store_true", help="train briefly on a small model")
args, _ = parser.parse_known_args()  # tolerate the extra arguments of a notebook kernel
QUICK = args.quick or os.environ.get("STEP_TUTORIAL_QUICK") == "1"
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)

EPOCHS = 5 if QUICK else 150
SIZE = (
    {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "n_layers": 1, "n_heads": 2}
    if QUICK
    else {"hidden_dim": 64, "n_modules": 32, "module_dim": 30, "n_layers": 2}
)

# %% [markdown]
# ## The data
#
# `pbmc68k_counts()` gives the raw integer counts of the 700 PBMCs that ship with
# scanpy (765 genes), with their annotated cell types in `obs["bulk_labels"]`. Nothing
# is downloaded. TranscriptFormer models counts with a count likelihood, so the data
# must *not* be normalised or log-transformed beforehand; the model normalises its
# encoder input itself.

# %%
adata = pbmc68k_counts()
print(adata)
print(adata.obs["bulk_labels"].value_counts().to_string())

# %% [markdown]
# ## Train
#
# `scModel` puts the pieces together: it prepares the counts on a private copy (the
# AnnData you pass only receives results), builds the model, holds out a validation
# split that keeps the proportions of every cell type (`class_key`), and trains with
# the `Trainer` until the validation losses stop improving or `epochs` is reached.
# When training ends the embedding is written to `adata.obsm["X_rep"]`: the posterior
# mean of every cell, so it is the same every time it is computed.

# %%
model = scModel(adata, class_key="bulk_labels", seed=0, **SIZE)
history = model.run(epochs=EPOCHS, batch_size=128, lr=2e-3)
print(model)
print(model.trainer.stop_reason or f"ran all {len(history)} epochs")

# %% [markdown]
# ## The training history
#
# One row per epoch: the mean of every loss term on the training cells and on the
# held-out cells (`val_...`), the learning rate, and the time the epoch took.
# `recon_loss` is the negative log-likelihood of a cell's counts, `kl_loss` the
# divergence of its latent distribution from the prior, and `total_loss` their sum.

# %%
columns = ["epoch", "lr_all", "recon_loss", "val_recon_loss", "kl_loss", "val_kl_loss"]
print(history[columns].tail(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, term in zip(axes, ("recon_loss", "kl_loss")):
    ax.plot(history["epoch"], history[term], label="training")
    ax.plot(history["epoch"], history[f"val_{term}"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_title(term)
axes[0].legend()
fig.tight_layout()
fig.savefig(OUT / "history.png", dpi=120)

# %% [markdown]
# ## Cluster the embedding
#
# The embedding plugs into the usual scanpy steps: a neighbour graph on `X_rep`, then
# Leiden clustering. The adjusted Rand index (ARI) measures how well the clusters
# match the annotated cell types (1 is a perfect match; about 0 is what shuffled labels
# give).

# %%
sc.pp.neighbors(adata, use_rep="X_rep", random_state=0)
sc.tl.leiden(adata, resolution=0.6, random_state=0, flavor="igraph", n_iterations=2)
ari = adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["leiden"])
rng = np.random.default_rng(0)
shuffled = adjusted_rand_score(adata.obs["bulk_labels"], rng.permutation(adata.obs["leiden"]))
print(f"{adata.obs['leiden'].nunique()} Leiden clusters; ARI with the cell types: {ari:.3f} "
      f"(shuffled clusters: {shuffled:.3f})")

# %% [markdown]
# A picture of the embedding: its first two principal components, coloured by the
# annotated cell type. (A UMAP is a single call away, `sc.tl.umap(adata)`, in the
# full run.)

# %%
if QUICK:
    coords, name = PCA(n_components=2).fit_transform(adata.obsm["X_rep"]), "PCA of X_rep"
else:
    sc.tl.umap(adata, random_state=0)
    coords, name = adata.obsm["X_umap"], "UMAP of X_rep"

fig, ax = plt.subplots(figsize=(6, 4.5))
for label in adata.obs["bulk_labels"].cat.categories:
    mask = (adata.obs["bulk_labels"] == label).to_numpy()
    ax.scatter(coords[mask, 0], coords[mask, 1], s=6, label=label)
ax.set_title(name)
ax.legend(fontsize=6, markerscale=2, loc="best")
fig.tight_layout()
fig.savefig(OUT / "embedding.png", dpi=120)

# %% [markdown]
# ## Save, load, embed again
#
# `save` writes a folder with the weights (`model.pt`), everything needed to rebuild
# the model (`config.json`: settings, genes, categories) and the history
# (`history.csv`). Nothing is stored inside the AnnData. `scModel.load` rebuilds the
# model for a data set that has the same genes, and `embed` computes the embedding
# without writing anything.

# %%
folder = model.save(OUT / "model")
print(sorted(p.name for p in folder.iterdir()))
again = scModel.load(folder, adata)
same = np.allclose(again.embed(), adata.obsm["X_rep"], atol=1e-5)
print(f"the loaded model reproduces the embedding: {same}")
assert same

# %% [markdown]
# Finally, the annotated data set with the embedding and the clusters:

# %%
adata.write_h5ad(OUT / "pbmc_embedded.h5ad")
print(f"wrote {OUT / 'pbmc_embedded.h5ad'}, {OUT / 'history.png'}, {OUT / 'embedding.png'}")
