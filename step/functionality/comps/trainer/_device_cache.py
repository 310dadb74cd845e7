"""Keep a small dataset on the training device and gather mini-batches there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class DeviceCachedLoader:
    """Wrap an index-batch loader so its dataset is densified on ``device`` once.

    Batches are then gathered with ``index_select`` on the device, in the order the
    wrapped loader's sampler gives (so shuffling and per-epoch seeding are unchanged),
    saving a host-to-device copy per step. Meant for datasets that fit in device memory.
    """

    def __init__(self, loader: Any, device: torch.device, *, max_bytes: int = 2**30) -> None:
        dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)
        if dataset is None or not hasattr(dataset, "n_genes") or self.sampler is None:
            msg = "device caching needs a loader made by index_loader / make_loaders."
            raise TypeError(msg)
        need = len(dataset) * dataset.n_genes * 4
        if need > max_bytes:
            msg = (f"caching this dataset would take {need / 2**20:.0f} MiB on {device}, more "
                   f"than the {max_bytes / 2**20:.0f} MiB allowed; train without caching.")
            raise ValueError(msg)
        self.device = device
        self.data = {k: v.to(device) for k, v in dataset[np.arange(len(dataset))].items()}

    def __len__(self) -> int:
        return len(self.sampler)

    def gather(self, idx: Any) -> dict[str, torch.Tensor]:
        """The batch of positions ``idx``, gathered on the device."""
        rows = torch.tensor(np.asarray(idx), dtype=torch.long, device=self.device)
        return {k: v.index_select(0, rows) for k, v in self.data.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.sampler:
            yield self.gather(idx)
