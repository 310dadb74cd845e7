"""Optional compiled backends, detected once at import time.

``WITH_PYG_LIB`` is true when ``pyg_lib`` imports and registers its neighbour
sampling operator; ``WITH_TORCH_CLUSTER`` is true when ``torch_cluster``
imports. Everything in :mod:`step.graph` works without either of them; they
only provide faster paths.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the installation
    import pyg_lib  # noqa: F401

    WITH_PYG_LIB = hasattr(torch.ops, "pyg") and hasattr(torch.ops.pyg, "neighbor_sample")
except (ImportError, OSError, RuntimeError):  # pragma: no cover
    WITH_PYG_LIB = False

try:  # pragma: no cover - depends on the installation
    import torch_cluster  # noqa: F401

    WITH_TORCH_CLUSTER = True
except (ImportError, OSError, RuntimeError):  # pragma: no cover
    WITH_TORCH_CLUSTER = False

__all__ = ["WITH_PYG_LIB", "WITH_TORCH_CLUSTER"]
