"""Running means of loss terms that keep no autograd graph and sync with the host once."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class RunningMeans:
    """Observation-weighted running means of named scalar tensors.

    Values are detached and accumulated on their own device, so adding a step costs no
    host synchronisation and holds no graph; :meth:`means` converts to floats once.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, torch.Tensor | float], n_obs: int = 1) -> None:
        """Add one step's values, each weighted by ``n_obs`` observations."""
        with torch.no_grad():
            for key, value in values.items():
                if torch.is_tensor(value):
                    value = value.detach().float()
                    if value.numel() != 1:
                        continue
                    value = value.reshape(())
                elif not isinstance(value, (int, float)):
                    continue
                prev = self.sums.get(key)
                self.sums[key] = value * n_obs if prev is None else prev + value * n_obs
                self.counts[key] = self.counts.get(key, 0) + n_obs

    def __bool__(self) -> bool:
        return bool(self.counts)

    def totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """Weighted sums and observation counts as floats (one host transfer)."""
        keys = sorted(self.sums)
        if not keys:
            return {}, {}
        sums = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).cpu()
                            for k in keys]).tolist()
        return dict(zip(keys, sums)), {k: float(self.counts[k]) for k in keys}

    def means(self, prefix: str = "") -> dict[str, float]:
        """Means as floats, keys optionally prefixed (``"val_"``)."""
        sums, counts = self.totals()
        return {f"{prefix}{k}": sums[k] / counts[k] for k in sums}
