"""Where the time of an end-to-end spatial training step goes (``torch.profiler``).

The step that ``spatial.py`` times against step-kit's ``stModel``: one
``RandomNodeSampler`` sub-graph of 1,024 spots from a 10,000-spot section of real cells
(765 genes), the TranscriptFormer with step-kit's sizes (hidden 64, 32 modules of size
30, ZINB, 3 layers / 8 heads) and the 2-layer GCN smoother, ``end_to_end=True`` (raw and
smoothed reconstruction, contrast and KL terms). After a few warm-up steps the profiler
records ``--steps`` steps; the table lists the operators with the most self CPU time,
and a second table sums them by part of the step.

Usage::

    python benchmarks/profile_spatial.py --threads 1
"""

from __future__ import annotations

from typing import Any

import _common as C
import numpy as np
import torch
from spatial import K, LR, NODES_PER_STEP, SPATIAL_KL

from step.datasets import spatial_sections_from_cells
from step.functionality.comps.trainer import Trainer
from step.graph import RandomNodeSampler, build_spatial_graph
from step.models import TranscriptFormer
from step.utils.dataset import StDataset

ROWS = 20
def profile(args: Any, steps: int) -> tuple[list[dict], float]:
    from torch.profiler import ProfilerActivity, profile as run_profiler

    adata = spatial_sections_from_cells(n_sections=1, grid=(100, 100), n_domains=4,
                                        seed=args.seed)
    dataset = StDataset(adata, spatial_key="spatial")
    edge_index = build_spatial_graph(np.asarray(adata.obsm["spatial"]), method="knn", k=K)
    sampler = RandomNodeSampler(edge_index, adata.n_obs, num_nodes_per_step=NODES_PER_STEP,
                                shuffle=True, seed=args.seed)
    torch.manual_seed(args.seed)
    model = TranscriptFormer(dataset.n_genes, kl_weight=SPATIAL_KL, **C.SAME_ARCH)
    model.init_smoother_with_builtin(n_layers=2)
    trainer = Trainer(model, device=args.device, seed=args.seed, verbose=False,
                      distributed=False, early_stopping=False)
    trainer.init_optimizer(lr=LR)
    warmup = 3
    trainer.train_node_sampler(1, sampler, dataset, max_steps=warmup, end_to_end=True)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with run_profiler(activities=activities) as prof:
        trainer.train_node_sampler(1, sampler, dataset, max_steps=steps, end_to_end=True)
        C.sync(args.device)
    return C.profile_rows(prof.key_averages(), steps)


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    args = parser.parse_args(argv)
    C.setup(args)
    info = C.machine(args)
    steps = 4 if args.quick else args.steps
    rows, step_ms = profile(args, steps)

    ops = C.Table("profile_spatial_ops", "Where the time of an end-to-end spatial step goes "
                  "(torch.profiler, self CPU time)", [
        C.Column("op", "operator"),
        C.Column("calls_per_step", "calls/step", C.fmt_float(1)),
        C.Column("self_ms_per_step", "self ms/step", C.fmt_float(2)),
        C.Column("share", "share", lambda v: f"{100 * v:.1f} %"),
    ])
    for row in rows[:ROWS]:
        ops.add(**row)
    ops.notes = [f"{step_ms:.1f} ms of operator self time per step over {steps} profiled "
                 "steps (profiler overhead included); 3 layers / 8 heads, fp32."]
    parts = C.Table("profile_spatial_parts", "The same, summed by part of the step", [
        C.Column("part", "part"),
        C.Column("self_ms_per_step", "self ms/step", C.fmt_float(2)),
        C.Column("share", "share", lambda v: f"{100 * v:.1f} %"),
    ])
    for row in C.profile_parts(rows):
        parts.add(**row)
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    C.write_report("profile_spatial", "Profile of an end-to-end spatial step", intro,
                   [ops, parts], info, args.out)


if __name__ == "__main__":
    main()
