"""Checkpoint methods of the Trainer: assemble, write, read, check and restore its state."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import _checkpoint as ckpt
from . import _distributed as ddp
from ._state import check_compatible, restore_trainer, trainer_state


class CheckpointMethods:
    """Mixed into :class:`Trainer`; every part's state goes through its ``state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain containers."""
        return trainer_state(self)

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
        """Restore what :meth:`state_dict` returned."""
        restore_trainer(self, state, restore_rng=restore_rng)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file + rename).

        Under data-parallel training only rank 0 writes; the others wait for it.
        """
        if self.is_main_process:
            ckpt.write_checkpoint(self.state_dict(), path)
        ddp.barrier()

    def load_checkpoint(self, path: str | os.PathLike, *, restore_rng: bool = True) -> None:
        """Restore a checkpoint so that the next call of the same loop continues exactly.

        The file is read without executing code; a checkpoint of another step version, of
        a model with other settings, or with other metadata is refused with a
        ``ValueError`` naming the differences. A loop that had finished returns at once
        when called again.
        """
        ddp.barrier()  # rank 0 may still be writing
        state = ckpt.read_checkpoint(path, map_location=self.device)
        check_compatible(self, state, path)
        self.load_state_dict(state, restore_rng=restore_rng)
