"""Models: TranscriptFormer, its building blocks and count likelihoods."""

from __future__ import annotations

from step.models._fused import fused_kernel_threads, fused_kernels_available, fused_kernels_off
from step.models._likelihoods import log_nb, log_poisson, log_zinb
from step.models.transcriptformer import TranscriptFormer

__all__ = ["TranscriptFormer", "fused_kernel_threads", "fused_kernels_available",
           "fused_kernels_off", "log_nb", "log_poisson", "log_zinb"]
