"""Workflows that train TranscriptFormer on AnnData and write results under documented keys.

- :class:`scModel`: single-cell embedding (one or several batches) and label refinement;
  writes ``obsm["X_rep"]`` and ``obsm["X_anchord"]``.
- :class:`stModel`: spatial domains; writes ``obsm["X_rep"]``, ``obsm["X_smoothed"]`` and
  ``obs["domain"]``.

Trained models are saved into a folder (``model.pt``, ``config.json``, ``history.csv``),
never into ``adata.uns``.
"""

from __future__ import annotations

from step.workflows.single_cell import scModel
from step.workflows.spatial import stModel

__all__ = ["scModel", "stModel"]
