"""Models: TranscriptFormer, its building blocks and count likelihoods."""

from __future__ import annotations

from step.models._likelihoods import log_nb, log_poisson, log_zinb
from step.models.transcriptformer import TranscriptFormer

__all__ = ["TranscriptFormer", "log_nb", "log_poisson", "log_zinb"]
