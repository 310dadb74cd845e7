# %% [markdown]
# # Integrate batches, then refine with labels
#
# Cells measured in different batches (samples, runs, technologies) differ for
# technical reasons, and a plain embedding tends to separate them by batch rather than
# by cell type. TranscriptFormer handles this with a *batch embedding* that feeds only
# its decoder: the decoder explains batch-specific differences, so the encoder's latent
# space can be shared by all batches.
#
# Once cells are embedded, known labels can sharpen the representation. The
# *refinement* stage attaches one anchor per cell type and fine-tunes in a second
# stage with two learning rates: the new anchors and classifier learn fast, the
# pretrained backbone slowly, so it adapts without forgetting what it learned.
#
# Run it with `python tutorials/02_integration_and_refinement.py --out tutorial-02`;
# add `--quick` for a short run on a small model.

# %%
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anndata as ad
import matplotlib

if "ipykernel" not in sys.modules:  # a script writes figures to files, no window
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from step.datasets import pbmc68k_counts
from step.workflows import scModel

parser = argparse.ArgumentParser(description="Batch integration and label refinement.")
parser.add_argument("--out", default="tutorial-02", help="folder for the outputs")
parser.add_argument("--quick", action="store_true", help="train briefly on a small model")
args, _ = parser.parse_known_args()  # tolerate the extra arguments of a notebook kernel
QUICK = args.quick or os.environ.get("STEP_TUTORIAL_QUICK") == "1"
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)

EPOCHS, REFINE_EPOCHS = (4, 3) if QUICK else (150, 40)
SIZE = (
    {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "n_layers": 1, "n_heads": 2}
    if QUICK
    else {"hidden_dim": 64, "n_modules": 32, "module_dim": 30, "n_layers": 2}
)

# %% [markdown]
# ## Two batches with a known batch effect
#
# We split the bundled PBMCs at random into two batches and give the second one a
# technical effect: every gene is captured with its own efficiency (between 5 % and
# 100 %, most of them low), applied by thinning the counts molecule by molecule. The cell types are the
# same in both batches, so a good integration mixes the batches while keeping the cell
# types apart.

# %%
rng = np.random.default_rng(0)
adata = pbmc68k_counts()
adata.obs["batch"] = pd.Categorical(rng.choice(["batch_a", "batch_b"], size=adata.n_obs))

counts = adata.X.tocsr(copy=True)
capture = 10 ** rng.uniform(-1.3, 0.0, size=adata.n_vars)  # per-gene capture efficiency
in_b = np.flatnonzero(adata.obs["batch"].to_numpy() == "batch_b")
for row in in_b:
    start, stop = counts.indptr[row], counts.indptr[row + 1]
    genes = counts.indices[start:stop]
    counts.data[start:stop] = rng.binomial(counts.data[start:stop].astype(np.int64),
                                           capture[genes])
counts.eliminate_zeros()
adata.X = counts
print(adata.obs["batch"].value_counts().to_string())


# %% [markdown]
# ## Two measures
#
# * **Batch mixing**: for every cell, the share of its 15 nearest neighbours in the
#   embedding that come from the *other* batch, averaged over cells. With two batches
#   of equal size, perfect mixing gives about 0.5 and complete separation 0.
# * **Cell-type ARI**: k-means clusters of the embedding (one per cell type) compared
#   with the annotated cell types by the adjusted Rand index.


# %%
def batch_mixing(embedding: np.ndarray, batches: np.ndarray, k: int = 15) -> float:
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return float((batches[idx[:, 1:]] != batches[:, None]).mean())


def cell_type_ari(embedding: np.ndarray, labels: pd.Series) -> float:
    k = labels.nunique()
    clusters = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(embedding)
    return adjusted_rand_score(labels, clusters)


def report(name: str, embedding: np.ndarray) -> dict[str, float]:
    row = {
        "embedding": name,
        "batch mixing": batch_mixing(embedding, adata.obs["batch"].to_numpy()),
        "cell-type ARI": cell_type_ari(embedding, adata.obs["bulk_labels"]),
    }
    print(f"{name:<28} batch mixing {row['batch mixing']:.3f}   "
          f"cell-type ARI {row['cell-type ARI']:.3f}")
    return row


# %% [markdown]
# ## Without batch information
#
# First a model that does not know about the batches. `key_added` keeps its embedding
# apart from the next one.

# %%
plain = scModel(adata, class_key="bulk_labels", seed=0, **SIZE)
plain.run(epochs=EPOCHS, lr=2e-3, key_added="X_plain", verbose=False)
rows = [report("no batch key", adata.obsm["X_plain"])]

# %% [markdown]
# ## With the batch embedding
#
# Passing `batch_key` gives the model one learned vector per batch, which the decoder
# receives next to the latent code. The validation split is still stratified by cell
# type.

# %%
model = scModel(adata, batch_key="batch", class_key="bulk_labels", seed=0, **SIZE)
history = model.run(epochs=EPOCHS, lr=2e-3, verbose=False)
rows.append(report("batch key", adata.obsm["X_rep"]))

# %% [markdown]
# ## Refine with the cell-type labels
#
# `refine` starts a second stage. It places one anchor per cell type at the mean
# embedding of that type, adds `cl_loss` (how well each cell's embedding points to its
# own anchor) to the reconstruction and KL terms, and rebuilds the optimizer with
# named parameter groups:
#
# * `head` (anchors and classifier) at `lr`,
# * `backbone` (tokenizer, transformer, readout, decoder) at the ten times smaller
#   `tune_lr`,
# * `batch` (the batch embedding) at `tune_lr` as well.
#
# The anchored representation is written to `adata.obsm["X_anchord"]`.

# %%
backbone_before = {n: p.detach().clone() for n, p in model.model.named_parameters()
                   if n.startswith("transformer")}
history = model.refine(epochs=REFINE_EPOCHS, lr=2e-3, tune_lr=2e-4, verbose=False)
rows.append(report("batch key + refinement", adata.obsm["X_anchord"]))

# %% [markdown]
# The history shows the two stages and, from the second stage on, one learning rate
# per group. `cl_loss` appears when refinement starts.

# %%
stage2 = history[history["stage"] == 2]
lr_columns = [c for c in stage2.columns if c.startswith("lr_") and stage2[c].notna().any()]
print(stage2[["epoch", *lr_columns, "cl_loss", "val_cl_loss", "val_recon_loss"]]
      .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
assert (stage2["lr_backbone"] < stage2["lr_head"]).all()

# %% [markdown]
# The backbone did move during refinement, just slowly:

# %%
moved = np.mean([(p.detach() - backbone_before[n]).abs().mean().item()
                 for n, p in model.model.named_parameters() if n in backbone_before])
print(f"mean absolute change of the transformer weights during refinement: {moved:.2e}")
assert moved > 0

# %% [markdown]
# ## Summary

# %%
summary = pd.DataFrame(rows)
print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
summary.to_csv(OUT / "summary.csv", index=False)
history.to_csv(OUT / "history.csv", index=False)

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, key, title in zip(axes, ("X_plain", "X_rep", "X_anchord"),
                          ("no batch key", "batch key", "batch key + refinement")):
    emb = adata.obsm[key]
    centred = emb - emb.mean(0)
    coords = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    for batch in adata.obs["batch"].cat.categories:
        mask = (adata.obs["batch"] == batch).to_numpy()
        ax.scatter(coords[mask, 0], coords[mask, 1], s=4, label=batch, alpha=0.7)
    ax.set_title(title)
axes[0].legend(markerscale=3)
fig.suptitle("first two principal components, coloured by batch")
fig.tight_layout()
fig.savefig(OUT / "batches.png", dpi=120)

# %% [markdown]
# The results stay in the AnnData under the documented keys; the model is saved to its
# own folder.

# %%
model.save(OUT / "model")
ad.AnnData(obs=adata.obs, obsm=dict(adata.obsm)).write_h5ad(OUT / "embeddings.h5ad")
print(f"wrote {OUT / 'summary.csv'}, {OUT / 'batches.png'} and {OUT / 'model'}")
