"""Inference in batches: apply a model method to every item of a dataset."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._plan import TrainingPlan, as_inputs


def predict(plan: TrainingPlan, data: Any, *, batch_size: int = 1024, method: str = "embed"
            ) -> np.ndarray:
    """``model.<method>`` of every item of ``data`` (a dataset or a loader), in eval mode.

    Returns a float32 NumPy array in dataset order.
    """
    from step.utils.dataset import index_loader

    plan.require(method, "predict")
    fn = getattr(plan.model, method)
    is_dataset = hasattr(data, "subset")
    loader = index_loader(data, batch_size, shuffle=False) if is_dataset else data
    # batches of a dataset go straight into one array: many small outputs kept until a
    # final concatenation fragment the heap and raise the peak memory
    out: np.ndarray | None = None
    outs: list[np.ndarray] = []
    start = 0
    with plan.evaluation(), plan.autocast():
        for inputs in loader:
            batch = fn(plan.to_device(as_inputs(inputs))).float().cpu().numpy()
            if not is_dataset:
                outs.append(batch)
                continue
            if out is None:
                out = np.empty((len(data), *batch.shape[1:]), dtype=np.float32)
            out[start:start + len(batch)] = batch
            start += len(batch)
    if out is not None:
        return out
    return np.concatenate(outs) if outs else np.empty((0,), dtype=np.float32)
