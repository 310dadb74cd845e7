# %% [markdown]
# # Find spatial domains
#
# In a tissue section, spots that lie close together usually belong to the same
# region, or *domain*. One spot alone identifies its domain poorly; its neighbourhood
# identifies it well. This tutorial trains TranscriptFormer with a graph smoother that
# averages information over spatial neighbours, clusters the smoothed embedding into
# domains, and compares them with the true layout. It does so twice:
#
# * **two-stage**: learn expression first on mini-batches of spots, then attach the
#   smoother and fine-tune on whole section graphs (the backbone at a smaller learning
#   rate);
# * **end-to-end**: learn everything at once on small sampled neighbourhoods, the way
#   to go when sections are too large to pass whole.
#
# Run it with `python tutorials/03_spatial_domains.py --out tutorial-03`; add `--quick`
# for a short run on a smaller data set and model.

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
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from step.datasets import spatial_sections_from_cells
from step.workflows import stModel

parser = argparse.ArgumentParser(description="Spatial domains with TranscriptFormer.")
parser.add_argument("--out", default="tutorial-03", help="folder for the outputs")
parser.add_argument("--quick", action="store_true", help="train briefly on small data")
args, _ = parser.parse_known_args()  # tolerate the extra arguments of a notebook kernel
QUICK = args.quick or os.environ.get("STEP_TUTORIAL_QUICK") == "1"
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)

GRID = (16, 16) if QUICK else (30, 30)
EPOCHS, GRAPH_EPOCHS, E2E_EPOCHS = (3, 3, 2) if QUICK else (60, 40, 30)
SIZE = (
    {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "n_layers": 1, "n_heads": 2}
    if QUICK
    else {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "n_layers": 2, "n_heads": 2}
)

# %% [markdown]
# ## Sections with a known layout
#
# `spatial_sections_from_cells` builds tissue sections from the bundled PBMCs: every
# section is a grid of spots cut into four contiguous domains, and each domain is a
# mixture of cell types around one dominant type. A spot holds one cell drawn from its
# domain's mixture, with thinned counts. The true domain of every spot is kept in
# `obs["domain_true"]`, so we can score the result.

# %%
adata = spatial_sections_from_cells(n_sections=3, grid=GRID, n_domains=4, seed=0)
N_DOMAINS = adata.obs["domain_true"].nunique()
print(adata)


def show_sections(adata, column: str, path: Path, title: str) -> None:
    sections = adata.obs["section"].cat.categories
    fig, axes = plt.subplots(1, len(sections), figsize=(3.2 * len(sections), 3.2))
    codes = adata.obs[column].astype("category").cat.codes.to_numpy()
    for ax, section in zip(np.atleast_1d(axes), sections):
        mask = (adata.obs["section"] == section).to_numpy()
        xy = adata.obsm["spatial"][mask]
        ax.scatter(xy[:, 0], xy[:, 1], c=codes[mask], cmap="tab10", vmin=0, vmax=9, s=12,
                   marker="s")
        ax.set_title(section)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.show()  # in a notebook: shows the figure; as a script: does nothing
    plt.close(fig)


show_sections(adata, "domain_true", OUT / "domains_true.png", "true domains")

# %% [markdown]
# ## Two-stage training
#
# `stModel` builds a neighbour graph per section (the 6 nearest spots; no edge ever
# joins two sections), prepares the counts, and trains:
#
# 1. `epochs` of mini-batch training on expression alone (`Trainer.train_batch`);
# 2. a graph smoother is attached, the optimizer is rebuilt for stage 2 (the smoother
#    at `lr`, the pretrained backbone at `tune_lr`) and `graph_epochs` of training over
#    whole section graphs follow (`Trainer.train_graph_batch`). Ten percent of the
#    spots of every section are held out: they stay in the graphs, so their neighbours
#    are smoothed with them, but only validation scores them.
#
# Two embeddings are written: `obsm["X_rep"]` from each spot alone and
# `obsm["X_smoothed"]` after smoothing over the graph. The backbone is *not* frozen in
# stage 2: the spatial losses reach it, and it keeps learning at its smaller rate.

# %%
model = stModel(adata, section_key="section", k=6, seed=0, **SIZE)
history = model.run(mode="two-stage", epochs=EPOCHS, graph_epochs=GRAPH_EPOCHS, lr=2e-3,
                    tune_lr=2e-4, verbose=False)
stage2 = history[history["loop"] == "train_graph_batch"]
print(stage2[["epoch", "lr_head", "lr_backbone", "recon_loss", "val_recon_loss",
              "contrast_loss"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


# %% [markdown]
# Cluster both embeddings into as many domains as there are, and compare with the
# truth by the adjusted Rand index (ARI):


# %%
def domain_ari(workflow: stModel, use_rep: str) -> float:
    workflow.cluster(N_DOMAINS, use_rep=use_rep, key_added="domain")  # k-means
    return adjusted_rand_score(adata.obs["domain_true"], adata.obs["domain"])


scores = {"two-stage, spot alone (X_rep)": domain_ari(model, "X_rep")}
scores["two-stage, smoothed (X_smoothed)"] = domain_ari(model, "X_smoothed")
show_sections(adata, "domain", OUT / "domains_two_stage.png", "two-stage domains")
two_stage = adata.obsm["X_smoothed"].copy()
model.save(OUT / "two_stage_model")

# %% [markdown]
# ## End-to-end training on sampled neighbourhoods
#
# Here the smoother is part of the model from the start and every step trains on a
# sampled neighbourhood: a batch of seed spots with up to 10 neighbours per hop, two
# hops deep (one per smoother layer). Only the seeds are scored. The cost of a step
# depends on the batch size and fan-out, not on the size of the section, which is what
# makes this mode scale to sections of millions of spots. Validation runs on
# neighbourhoods of the held-out spots at the end of each epoch, and every
# `valid_every` steps as well.

# %%
e2e = stModel(adata, section_key="section", k=6, seed=0, **SIZE)
history = e2e.run(mode="end-to-end", epochs=E2E_EPOCHS, lr=2e-3, sampler_batch_size=128,
                  valid_every=5, verbose=False)
print(history[["epoch", "recon_loss", "raw_recon_loss", "val_recon_loss",
               "contrast_loss"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
print(f"{len(e2e.trainer.step_history)} validations during training, "
      f"{e2e.trainer.global_step} steps in all")

scores["end-to-end, spot alone (X_rep)"] = domain_ari(e2e, "X_rep")
scores["end-to-end, smoothed (X_smoothed)"] = domain_ari(e2e, "X_smoothed")
show_sections(adata, "domain", OUT / "domains_end_to_end.png", "end-to-end domains")

# %% [markdown]
# ## Summary
#
# With enough training, smoothing over the neighbourhood recovers the domains much
# better than the spot-level embedding (the quick run trains too briefly to show it
# reliably).

# %%
summary = pd.DataFrame({"embedding": list(scores), "domain ARI": list(scores.values())})
print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
summary.to_csv(OUT / "summary.csv", index=False)
history.to_csv(OUT / "history_end_to_end.csv", index=False)
adata.obsm["X_smoothed_two_stage"] = two_stage
adata.write_h5ad(OUT / "sections.h5ad")
print(f"wrote {OUT / 'summary.csv'}, the domain maps and {OUT / 'sections.h5ad'}")
