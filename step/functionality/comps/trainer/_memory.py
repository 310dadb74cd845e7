"""How training uses glibc's allocator: reuse of freed memory between steps, and a
callback that hands freed memory back to the operating system.

With its own settings glibc often gives a freed buffer of a few MiB back to the system
(``munmap``, or a trim of the heap's top), and the next step's buffer of the same size
is faulted in again, page by page: 1,000-1,600 page faults per training step of the
single-cell model. :func:`reuse_freed_memory` makes glibc keep such buffers in the
heap for the next step.

Memory kept in the heap has the opposite cost when the sizes of the steps' tensors
vary from step to step (sub-graphs sampled from a large graph): the kept memory is
fragmented and the resident memory of the process keeps growing although the live
memory does not. ``malloc_trim`` (:class:`ReleaseFreedMemory`) returns the free pages.
Each release costs the page faults of touching the returned pages again: in
``benchmarks/out_of_core_spatial.py`` (2M spots, a release every 4-5 steps) training ran
at 0.74 times the speed without releases, and releasing after every step at about half.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

__all__ = ["ReleaseFreedMemory", "reuse_freed_memory"]

_MIB = 1 << 20
# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: buffers below this size come from the heap, where freed memory is reused (glibc's
#: largest accepted mmap threshold on 64-bit systems)
REUSE_BELOW = 32 * _MIB
#: free memory at the top of the heap up to this size is kept, not returned
KEEP_FREE = 256 * _MIB


def _libc_function(name: str) -> Any:
    """A function of the C library (glibc's ``malloc_trim``, ``mallopt``), or ``None``
    where the C library has none."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc reuse the buffers that one training step frees for the next ones.

    Sets, once per process, glibc's mmap threshold to 32 MiB (smaller buffers come from
    the heap, whose freed memory is reused without page faults) and its trim threshold
    to 256 MiB (up to that much free memory at the top of the heap is kept rather than
    returned to the system). Buffers of 32 MiB or more are still mapped and unmapped
    one by one. These settings hold for the whole process and are not undone. A
    :class:`~step.functionality.comps.trainer.Trainer` built for the CPU calls this,
    unless ``reuse_freed_memory=False``; :class:`ReleaseFreedMemory` still returns free
    memory when asked.

    Returns
    -------
    bool
        Whether the settings are in effect (False where the C library is not glibc).
    """
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, REUSE_BELOW)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE))


def _resident_bytes() -> int | None:
    """Resident memory of this process (Linux), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ReleaseFreedMemory:
    """Return freed heap memory to the system when the process's resident memory grows.

    Pass it to the Trainer (``Trainer(..., callbacks=[ReleaseFreedMemory()])``). After
    each optimizer step it reads the resident memory of the process; when that has
    grown by more than ``threshold_mib`` since the first step after the last release
    (one step's working memory included), it calls glibc's ``malloc_trim``. Useful for
    sub-graph training on large graphs
    (:meth:`~step.functionality.comps.trainer.Trainer.train_node_sampler`), whose steps
    allocate tensors of varying sizes.

    Parameters
    ----------
    threshold_mib
        Growth of resident memory, in MiB, that triggers a release.

    Attributes
    ----------
    releases
        Number of releases so far.
    available
        Whether this platform offers ``malloc_trim`` and the resident memory (Linux
        with glibc); elsewhere the callback does nothing.
    """

    def __init__(self, threshold_mib: float = 256) -> None:
        if isinstance(threshold_mib, bool) or not isinstance(threshold_mib, int | float) \
                or not threshold_mib > 0:
            msg = f"threshold_mib must be a positive number, received {threshold_mib!r}"
            raise ValueError(msg)
        self.threshold = float(threshold_mib) * _MIB
        self._trim = _libc_function("malloc_trim")
        self.available = self._trim is not None and _resident_bytes() is not None
        self._base: int | None = None
        self.releases = 0

    def release(self) -> None:
        """Return the free pages now; the resident memory after the next step (one
        step's working memory included) becomes the base the growth is measured from."""
        if self.available:
            self._trim(0)
            self.releases += 1
            self._base = None

    def on_train_start(self) -> None:
        self.release()

    def on_train_batch_end(self) -> None:
        if not self.available:
            return
        current = _resident_bytes()
        if current is None:
            return
        if self._base is None:
            self._base = current
        elif current - self._base > self.threshold:
            self.release()
