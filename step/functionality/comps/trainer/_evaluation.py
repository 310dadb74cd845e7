"""The evaluation loop: one way to compute validation means for every kind of source."""

from __future__ import annotations

from collections.abc import Iterable

from . import _distributed as ddp
from ._early_stopping import TOTAL_KEY
from ._plan import TrainingPlan
from ._running import RunningMeans
from .sources import Batch


def epoch_means(means: RunningMeans, prefix: str = "") -> dict[str, float]:
    """Observation-weighted means, summed over processes under data-parallel training."""
    sums, counts = ddp.reduce_sums(*means.totals())
    return {f"{prefix}{k}": sums[k] / counts[k] for k in sorted(sums) if counts[k] > 0}


class EvaluationLoop:
    """Mean loss terms (``val_<term>``) over batches, in eval mode and without gradients.

    The KL weight is the model's full weight (no warm-up), so that values of different
    epochs can be compared.
    """

    def __init__(self, plan: TrainingPlan) -> None:
        self.plan = plan

    def run(self, batches: Iterable[Batch]) -> dict[str, float]:
        means = RunningMeans()
        with self.plan.evaluation():
            for batch in batches:
                if batch.compute is None:
                    continue
                loss_dict = batch.compute()
                means.add(loss_dict, batch.n_obs)
                means.add({TOTAL_KEY: self.plan.total(loss_dict)}, batch.n_obs)
        return epoch_means(means, "val_")
