"""Writing files so that a crash never leaves a partial one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(handle)`` into a temporary file, then rename it.

    The temporary file lives in the destination folder, so the final rename is atomic:
    readers see the old file or the complete new one, never a partial write.

    Parameters
    ----------
    path
        Destination file; missing parent folders are created.
    write
        Called with a binary file handle open for writing.

    Returns
    -------
    The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
