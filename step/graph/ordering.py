"""Row orders that keep spatial neighbourhoods contiguous: sections, then a space-filling curve.

Training from counts on disk reads the rows of each sampled sub-graph. When the rows
of a store follow a space-filling curve through each section, the nodes of a spatial
neighbourhood sit in a few contiguous row ranges, so one sub-graph costs a few reads
instead of one read per node.

The default curve is the Hilbert curve: consecutive cells of the curve are always
adjacent in space, so a compact region maps to few, long runs of rows. The Morton
(Z-order) curve is cheaper to compute but jumps across the region at every
power-of-two boundary, which splits neighbourhoods into more runs; it is offered for
comparison.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from step.graph._validate import section_codes

__all__ = ["spatial_order"]

Curve = Literal["hilbert", "morton"]
_CURVES = ("hilbert", "morton")


def _grid(coords: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer cells in ``[0, 2**bits)`` of 2-d points, one scale for both axes."""
    lo = coords.min(axis=0)
    extent = float((coords.max(axis=0) - lo).max())
    scale = (2**bits - 1) / extent if extent > 0 else 0.0
    cells = np.floor((coords - lo) * scale).astype(np.uint64)
    return cells[:, 0], cells[:, 1]


def _hilbert_key(x: np.ndarray, y: np.ndarray, bits: int) -> np.ndarray:
    """Position along the Hilbert curve of the cells ``(x, y)`` of a ``2**bits`` grid."""
    x, y = x.copy(), y.copy()
    side = np.uint64(2**bits)
    key = np.zeros(x.shape, dtype=np.uint64)
    for level in range(bits - 1, -1, -1):
        s = np.uint64(1 << level)
        rx = (x & s) > 0
        ry = (y & s) > 0
        key += s * s * ((np.uint64(3) * rx.astype(np.uint64)) ^ ry.astype(np.uint64))
        # Rotate the quadrant so the sub-curve starts and ends where the next level expects.
        flip = ~ry & rx
        x[flip] = side - np.uint64(1) - x[flip]
        y[flip] = side - np.uint64(1) - y[flip]
        swap = ~ry
        x[swap], y[swap] = y[swap], x[swap].copy()
    return key


def _morton_key(x: np.ndarray, y: np.ndarray, bits: int) -> np.ndarray:
    """Bit-interleaved (Z-order) key of the cells ``(x, y)``."""
    key = np.zeros(x.shape, dtype=np.uint64)
    for b in range(bits):
        bit = np.uint64(b)
        key |= ((x >> bit) & np.uint64(1)) << np.uint64(2 * b)
        key |= ((y >> bit) & np.uint64(1)) << np.uint64(2 * b + 1)
    return key


def spatial_order(
    coords: Any,
    sections: Any = None,
    *,
    curve: Curve = "hilbert",
    bits: int = 16,
) -> np.ndarray:
    """Row permutation that groups spots by section and orders each section along a curve.

    Parameters
    ----------
    coords
        Spot coordinates, shape ``(n, >=2)`` (the first two columns are used); finite.
    sections
        One section label per spot, or ``None`` for one section. Sections come in
        label order (category order for categoricals).
    curve
        ``"hilbert"`` (default) or ``"morton"``; see the module notes.
    bits
        Resolution of the curve per axis (``2**bits`` cells), 1 to 31. Spots that fall
        into one cell keep their original relative order.

    Returns
    -------
    numpy.ndarray
        ``int64`` permutation ``order``: row ``i`` of the reordered data is row
        ``order[i]`` of the input (``adata[order]``).

    Raises
    ------
    ValueError
        If the coordinates are not finite or not 2-d, ``curve`` is unknown or ``bits``
        is out of range.
    """
    if curve not in _CURVES:
        msg = f"`curve` must be one of {_CURVES}, got {curve!r}."
        raise ValueError(msg)
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 31:
        msg = f"`bits` must be an integer from 1 to 31, got {bits!r}."
        raise ValueError(msg)
    if isinstance(coords, torch.Tensor):
        coords = coords.detach().cpu().numpy()
    pts = np.asarray(coords, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] < 2 or pts.shape[0] == 0:
        msg = f"`coords` must have shape (n, >=2) with n >= 1, got {pts.shape}."
        raise ValueError(msg)
    pts = pts[:, :2]
    if not np.isfinite(pts).all():
        msg = "`coords` holds NaN or infinite values."
        raise ValueError(msg)
    codes, _ = section_codes(sections, pts.shape[0])
    keys = np.zeros(pts.shape[0], dtype=np.uint64)
    encode = _hilbert_key if curve == "hilbert" else _morton_key
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        keys[rows] = encode(*_grid(pts[rows], bits), bits)
    return np.lexsort((keys, codes)).astype(np.int64)
