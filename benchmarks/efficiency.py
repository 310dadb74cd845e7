"""How much of the machine's matrix-multiply speed single-cell training uses.

For each configuration the script

1. counts the floating-point operations of one training step (forward and backward of
   ``TranscriptFormer.loss`` on a batch of 128 cells) with
   ``torch.utils.flop_counter.FlopCounterMode`` and divides by 128 (counted with the
   fused CPU kernels off and attention through PyTorch's math path, whose products the
   counter sees: the fused kernels do the same arithmetic, which the counter cannot see);
2. measures steady-state training cells/s with ``Trainer.train_batch`` (first epoch
   excluded, as in ``throughput.py``);
3. measures, right before and after each row, the dense GEMM rate of the products the
   model is made of ((128·33, 64)×(64, 192|256), (128·33, 256)×(256, 64),
   (128, genes)×(genes, 960), ...) in fp32 (bf16 for the bf16 rows); the best shape,
   averaged over the two measurements, is the "peak";
4. reports achieved GFLOP/s = FLOPs/cell × cells/s and its share of the peak (target:
   at least 50 % on CPU).

Rows cover both transformer sizes (3 layers / 8 heads as in step-kit, and 2 layers /
4 heads, our default), fp32 and bf16 autocast, with the library as shipped (on CPUs a
fused kernel for attention with heads of 4 or 8 dimensions, in fp32 and under bf16
autocast, one for the feed-forward bias and GELU in fp32 and one for the negative
binomial likelihoods; otherwise self-attention as two batched matmuls and a softmax)
and, for comparison, with PyTorch's own attention kernel put back in this process
(``_common.pytorch_attention``) and with the likelihood computed by its elementwise
formula (``_common.elementwise_likelihood``), in fp32.
``torch.profiler`` tables of the shipped step (same architecture) show where the time
goes.

Usage::

    python benchmarks/efficiency.py --quick      # PBMC counts (765 genes)
    python benchmarks/efficiency.py              # + synthetic 2,000-gene counts
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import _common as C
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from step.datasets import pbmc68k_counts, synthetic_counts
from step.functionality.comps.trainer import Trainer
from step.models import TranscriptFormer
from step.models._fused import fused_kernels_off
from step.utils.dataset import ScDataset, index_loader
from throughput import KL_WEIGHT, LR, epoch_rates

BATCH_SIZE = 128
PROFILE_ROWS = 20
VARIANT_LABELS = {None: "as shipped", "pytorch_attention": "PyTorch attention kernel (comparison)",
                  "elementwise_likelihood": "elementwise likelihood (comparison)"}


def step_flops(model: TranscriptFormer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """FLOPs of one forward + backward of ``model.loss`` by operator, in fp32."""
    counter = FlopCounterMode(display=False)
    model.train()
    with fused_kernels_off(), sdpa_kernel([SDPBackend.MATH]), counter:
        terms = model.loss(batch)
        sum(terms.values()).backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"total": float(counter.get_total_flops()), **by_op}


def gemm_shapes(n_genes: int, arch: dict[str, Any]) -> list[tuple[int, int, int]]:
    tokens = BATCH_SIZE * (arch["n_modules"] + 1)
    hidden = arch["hidden_dim"]
    return [(tokens, hidden, 3 * hidden), (tokens, hidden, 4 * hidden),
            (tokens, 4 * hidden, hidden), (BATCH_SIZE, n_genes,
                                          arch["n_modules"] * arch["module_dim"]),
            (BATCH_SIZE, hidden, n_genes)]


def comparison_context(comparison: str | None) -> Any:
    """The context that puts an unfused part back for a comparison row (or none)."""
    if comparison == "pytorch_attention":
        return C.pytorch_attention()
    if comparison == "elementwise_likelihood":
        return C.elementwise_likelihood()
    return contextlib.nullcontext()


def train_rate(dataset: ScDataset, arch: dict[str, Any], *, amp: str | None, epochs: int,
               device: str, seed: int, comparison: str | None) -> float:
    model = TranscriptFormer(dataset.n_genes, kl_weight=KL_WEIGHT, **arch)
    clock = C.StepClock(device)
    trainer = Trainer(model, device=device, seed=seed, amp=amp, verbose=False,
                      callbacks=[clock], distributed=False)
    trainer.init_optimizer(lr=LR)
    loader = index_loader(dataset, BATCH_SIZE, shuffle=True, seed=seed)
    with comparison_context(comparison):
        start = time.perf_counter()
        trainer.train_batch(epochs, (loader, None))
    return epoch_rates(clock.times, start, len(dataset), len(loader), epochs)["cells_per_s"]


def profile_step(dataset: ScDataset, arch: dict[str, Any], *, amp: str | None, device: str,
                 seed: int, steps: int, comparison: str | None = None
                 ) -> tuple[list[dict], float]:
    """Top operators (self time) over ``steps`` training steps after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    model = TranscriptFormer(dataset.n_genes, kl_weight=KL_WEIGHT, **arch)
    trainer = Trainer(model, device=device, seed=seed, amp=amp, verbose=False,
                      distributed=False)
    trainer.init_optimizer(lr=LR)
    loader = index_loader(dataset, BATCH_SIZE, shuffle=True, seed=seed, drop_last=True)
    batches = [b for _, b in zip(range(steps), loader)]

    def step(batch):
        trainer.update_model_params(trainer.handle_input_tuple(trainer.to_device(batch)))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with comparison_context(comparison):
        for batch in batches[:3]:
            step(batch)
        with profile(activities=activities) as prof:
            for batch in batches:
                step(batch)
            C.sync(device)
    return C.profile_rows(prof.key_averages(), len(batches))


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--epochs", type=int, help="training epochs per row (first excluded)")
    parser.add_argument("--profile-steps", type=int, default=12)
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16 rows and profiles (on CPUs without native bf16 "
                             "they are emulated and many times slower than fp32)")
    args = parser.parse_args(argv)
    C.setup(args)
    info = C.machine(args)

    datasets = [("pbmc", pbmc68k_counts(), args.epochs or 5)]
    if not args.quick:
        datasets.append(("synthetic-5k", synthetic_counts(5_000, 2000, density=0.05,
                                                          seed=args.seed), args.epochs or 3))
    archs = [("same", C.SAME_ARCH), ("defaults", C.OUR_DEFAULTS)]
    variants = [(None, None), (None, "pytorch_attention"), (None, "elementwise_likelihood")] + (
        [] if args.no_bf16 else [("bf16", None), ("bf16", "pytorch_attention")])

    table = C.Table("efficiency", "Training FLOP rate versus the machine's GEMM rate", [
        C.Column("dataset", "data"),
        C.Column("n_genes", "genes", C.fmt_int),
        C.Column("architecture", "architecture"),
        C.Column("precision", "precision"),
        C.Column("variant", "variant"),
        C.Column("mflop_per_cell", "MFLOP/cell", C.fmt_float(1)),
        C.Column("cells_per_s", "cells/s", C.fmt_float(0)),
        C.Column("achieved_gflops", "achieved GFLOP/s", C.fmt_float(1)),
        C.Column("peak_gflops", "GEMM peak GFLOP/s", C.fmt_float(1)),
        C.Column("pct_of_peak", "% of peak", C.fmt_float(1)),
    ])
    gemm = C.Table("efficiency_gemm", "Dense GEMM rates measured in the same run", [
        C.Column("shape", "(m, k) × (k, n)"),
        C.Column("dtype", "dtype"),
        C.Column("gflops", "GFLOP/s (median over measurements)", C.fmt_float(1)),
        C.Column("gflops_max", "best", C.fmt_float(1)),
        C.Column("n", "measurements"),
    ])
    flops_table = C.Table("efficiency_flops", "FLOPs of one training step by operator "
                          "(batch of 128, forward + backward)", [
        C.Column("dataset", "data"),
        C.Column("architecture", "architecture"),
        C.Column("op", "operator"),
        C.Column("gflop_per_step", "GFLOP/step", C.fmt_float(3)),
    ])
    profile_table = C.Table("efficiency_profile", "Where the time of a training step goes "
                            "(torch.profiler, self CPU time)", [
        C.Column("config", "configuration"),
        C.Column("op", "operator"),
        C.Column("calls_per_step", "calls/step", C.fmt_float(1)),
        C.Column("self_ms_per_step", "self ms/step", C.fmt_float(2)),
        C.Column("share", "share", lambda v: f"{100 * v:.1f} %"),
    ])
    parts_table = C.Table("efficiency_parts", "The same, summed by part of the step", [
        C.Column("config", "configuration"),
        C.Column("part", "part"),
        C.Column("self_ms_per_step", "self ms/step", C.fmt_float(2)),
        C.Column("share", "share", lambda v: f"{100 * v:.1f} %"),
    ])

    measured: dict[tuple, list[float]] = {}

    def gemm_peak(shapes, dtype) -> float:
        """Best rate over the model's GEMM shapes, measured now (the machine is shared:
        the rate is taken right before and after every row and averaged)."""
        best = 0.0
        for shape in shapes:
            rate = C.gemm_gflops(shape, dtype=dtype, device=args.device, repeats=7)
            measured.setdefault((shape, dtype), []).append(rate)
            best = max(best, rate)
        return best

    for name, adata, epochs in datasets:
        dataset = ScDataset(adata)
        batch = dataset[list(range(BATCH_SIZE))]
        for arch_name, arch in archs:
            label = C.ARCH_LABELS[arch_name]
            torch.manual_seed(args.seed)
            flops = step_flops(TranscriptFormer(dataset.n_genes, kl_weight=KL_WEIGHT, **arch),
                               batch)
            for op, value in flops.items():
                if op != "total":
                    flops_table.add(dataset=name, architecture=label, op=op,
                                    gflop_per_step=value / 1e9)
            flops_table.add(dataset=name, architecture=label, op="total",
                            gflop_per_step=flops["total"] / 1e9)
            per_cell = flops["total"] / BATCH_SIZE
            for amp, comparison in variants:
                dtype = torch.bfloat16 if amp == "bf16" else torch.float32
                shapes = gemm_shapes(dataset.n_genes, arch)
                print(f"[{name}] {label}, {amp or 'fp32'}, {VARIANT_LABELS[comparison]}",
                      flush=True)
                before = gemm_peak(shapes, dtype)
                rate = train_rate(dataset, arch, amp=amp, epochs=epochs, device=args.device,
                                  seed=args.seed, comparison=comparison)
                peak = 0.5 * (before + gemm_peak(shapes, dtype))
                achieved = per_cell * rate / 1e9
                table.add(dataset=name, n_genes=dataset.n_genes, architecture=label,
                          precision=amp or "fp32",
                          variant=VARIANT_LABELS[comparison],
                          mflop_per_cell=per_cell / 1e6, cells_per_s=rate,
                          achieved_gflops=achieved, peak_gflops=peak,
                          pct_of_peak=100 * achieved / peak)

    for (shape, dtype), rates in measured.items():
        gemm.add(shape=f"({shape[0]}, {shape[1]}) × ({shape[1]}, {shape[2]})",
                 dtype=str(dtype).replace("torch.", ""), gflops=float(np.median(rates)),
                 gflops_max=max(rates), n=len(rates))

    profiles = [("fp32, 3 layers / 8 heads, as shipped", None, None)]
    if not args.no_bf16:
        profiles += [("bf16, 3 layers / 8 heads, as shipped", "bf16", None),
                     ("bf16, 3 layers / 8 heads, PyTorch attention kernel", "bf16",
                      "pytorch_attention")]
    step_ms = {}
    dataset = ScDataset(datasets[0][1])
    for config, amp, comparison in profiles:
        print(f"profiling {config}", flush=True)
        rows, ms = profile_step(dataset, C.SAME_ARCH, amp=amp, device=args.device,
                                seed=args.seed, steps=args.profile_steps,
                                comparison=comparison)
        step_ms[config] = ms
        for row in rows[:PROFILE_ROWS]:
            profile_table.add(config=config, **row)
        for row in C.profile_parts(rows):
            parts_table.add(config=config, **row)

    table.notes = [
        "FLOPs counted for fp32 (bf16 rows do the same products); MFLOP/cell = FLOPs of one "
        "step / 128.",
        "peak = the best median rate over the model's GEMM shapes in that dtype, measured "
        "right before and right after the row and averaged (the machine is shared; see the "
        "GEMM table for every shape).",
        "shipped: on CPUs the library runs attention with heads of 4 or 8 dimensions "
        "through its fused kernel, in fp32 and under bf16 autocast (otherwise as "
        "matmul-softmax-matmul), and in fp32 the feed-forward bias and GELU through "
        "another, and the negative binomial likelihoods with their gradients through a "
        "third; PyTorch attention kernel: the encoder layers use "
        "PyTorch's scaled_dot_product_attention (its CPU flash-attention kernel) for "
        "attention instead, in this process only, to show what the shipped path gains; "
        "elementwise likelihood: the likelihood as the elementwise formula of "
        "step.models._likelihoods with its autograd record, in this process only.",
    ]
    profile_table.notes = [f"{config}: {ms:.1f} ms of operator self time per step "
                           "(profiler overhead included)" for config, ms in step_ms.items()]
    intro = C.doc_intro(__doc__) + f"\n\nThreads: {args.threads}."
    C.write_report("efficiency", "Training efficiency", intro,
                   [table, gemm, flops_table, profile_table, parts_table], info, args.out)


if __name__ == "__main__":
    main()
