"""step: TranscriptFormer training for single-cell and spatial transcriptomics."""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]
