"""Input checks and conversions shared by graph construction and sampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch


def check_int(value: Any, name: str, *, minimum: int) -> int:
    """Return ``value`` as ``int`` after checking it is an integer ``>= minimum``.

    Parameters
    ----------
    value
        The value to check (Python or NumPy integer; ``bool`` is rejected).
    name
        Argument name used in the error message.
    minimum
        Smallest allowed value.

    Returns
    -------
    int
        The checked value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        msg = f"`{name}` must be an integer >= {minimum}, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    if value < minimum:
        msg = f"`{name}` must be an integer >= {minimum}, got {value}."
        raise ValueError(msg)
    return int(value)


def section_codes(sections: Any, n: int, *, name: str = "sections") -> tuple[np.ndarray, list]:
    """Turn per-node section labels into integer codes.

    Parameters
    ----------
    sections
        Array-like of length ``n`` holding one label per node (strings,
        integers, a categorical, a tensor), or ``None`` for one section.
    n
        Number of nodes.
    name
        Argument name used in error messages.

    Returns
    -------
    codes
        ``int64`` array of shape ``(n,)`` with values in ``[0, n_sections)``.
    labels
        The section label of each code, in sorted label order (category
        order for categoricals).
    """
    if sections is None:
        return np.zeros(n, dtype=np.int64), [0]
    if isinstance(sections, torch.Tensor):
        sections = sections.detach().cpu().numpy()
    if isinstance(sections, (pd.Series, pd.Categorical, pd.Index)):
        values = pd.Series(sections)
    else:
        arr = np.asarray(sections)
        if arr.ndim != 1:
            msg = (
                f"`{name}` must be one-dimensional with one label per node, got shape {arr.shape}."
            )
            raise ValueError(msg)
        values = pd.Series(arr)
    if len(values) != n:
        msg = f"`{name}` has {len(values)} labels but there are {n} nodes; lengths must match."
        raise ValueError(msg)
    codes, uniques = pd.factorize(values, sort=True)
    if n > 0 and (codes < 0).any():
        n_missing = int((codes < 0).sum())
        msg = f"`{name}` contains {n_missing} missing labels; every node needs a section."
        raise ValueError(msg)
    return codes.astype(np.int64, copy=False), list(uniques.tolist())


def as_edge_index(edge_index: Any, num_nodes: int | None = None) -> torch.Tensor:
    """Check and convert an edge list to a contiguous ``int64`` tensor ``(2, E)``.

    Parameters
    ----------
    edge_index
        Tensor or array of shape ``(2, E)`` with integer node ids.
    num_nodes
        When given, every id must lie in ``[0, num_nodes)``.

    Returns
    -------
    torch.Tensor
        ``int64`` tensor of shape ``(2, E)`` on the CPU.
    """
    if not isinstance(edge_index, torch.Tensor):
        edge_index = torch.tensor(np.asarray(edge_index))  # a copy: the array may be read-only
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        msg = f"`edge_index` must have shape (2, E), got {tuple(edge_index.shape)}."
        raise ValueError(msg)
    if edge_index.dtype.is_floating_point or edge_index.dtype in (torch.bool, torch.complex64):
        msg = f"`edge_index` must hold integer node ids, got dtype {edge_index.dtype}."
        raise TypeError(msg)
    edge_index = edge_index.detach().to(device="cpu", dtype=torch.long).contiguous()
    if edge_index.numel() and int(edge_index.min()) < 0:
        msg = "`edge_index` contains negative node ids."
        raise ValueError(msg)
    if num_nodes is not None and edge_index.numel() and int(edge_index.max()) >= num_nodes:
        msg = (
            f"`edge_index` refers to node {int(edge_index.max())} but `num_nodes` is "
            f"{num_nodes}; ids must lie in [0, num_nodes)."
        )
        raise ValueError(msg)
    return edge_index


def as_num_neighbors(num_neighbors: int | Sequence[int]) -> tuple[int, ...]:
    """Check a per-hop fan-out: positive integers, or ``-1`` for all neighbours."""
    if isinstance(num_neighbors, (int, np.integer)) and not isinstance(num_neighbors, bool):
        num_neighbors = (int(num_neighbors),)
    try:
        values = tuple(num_neighbors)
    except TypeError:
        msg = f"`num_neighbors` must be a sequence of integers, got {num_neighbors!r}."
        raise TypeError(msg) from None
    if not values:
        msg = "`num_neighbors` must name at least one hop, got an empty sequence."
        raise ValueError(msg)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
            msg = (
                f"`num_neighbors` entries must be integers >= 1 or -1 (all neighbours), "
                f"got {values!r}."
            )
            raise ValueError(msg)
        out.append(int(v))
    return tuple(out)
