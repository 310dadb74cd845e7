"""Helpers shared by the benchmark scripts: arguments, machine description, GEMM probes,
result tables (printed with rich, written as CSV, Markdown and JSON) and the step-kit
driver run in its own environment.

Nothing here is part of the ``step`` package; the scripts import it from their folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results"
DRIVER = HERE / "peers" / "stepkit_driver.py"
DEFAULT_STEPKIT_PYTHON = Path.home() / ".cache" / "step-peers" / "stepkit" / "bin" / "python"
SCVI_DRIVER = HERE / "peers" / "scvi_driver.py"
DEFAULT_SCVI_PYTHON = Path.home() / ".cache" / "step-peers" / "scvi" / "bin" / "python"

#: The architecture of the public STEP release's single-cell model (step-kit 0.3): hidden 64,
#: 32 gene modules of size 30, ZINB likelihood, 3 transformer layers with 8 heads.
SAME_ARCH = {"hidden_dim": 64, "n_modules": 32, "module_dim": 30, "likelihood": "zinb",
             "n_layers": 3, "n_heads": 8}
#: The same sizes with this package's transformer defaults (2 layers, 4 heads).
OUR_DEFAULTS = {"hidden_dim": 64, "n_modules": 32, "module_dim": 30, "likelihood": "zinb",
                "n_layers": 2, "n_heads": 4}
ARCH_LABELS = {"same": "3 layers, 8 heads (as step-kit)",
               "defaults": "2 layers, 4 heads (our defaults)"}


# --------------------------------------------------------------------------- arguments
def base_parser(doc: str) -> argparse.ArgumentParser:
    """Arguments every benchmark script takes."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few epochs (each script < 5 minutes on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device for training (default: cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads, also passed to step-kit "
                             "(default: all cores, %(default)s here)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the CSV, Markdown and JSON results "
                             "(default: benchmarks/results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stepkit-python", type=Path,
                        default=Path(os.environ.get("STEPKIT_PYTHON", DEFAULT_STEPKIT_PYTHON)),
                        help="python of the separate step-kit 0.3 environment "
                             "(default: $STEPKIT_PYTHON or ~/.cache/step-peers/stepkit)")
    parser.add_argument("--no-stepkit", action="store_true",
                        help="skip the step-kit rows")
    return parser


def setup(args: argparse.Namespace) -> None:
    """Apply the thread count and check the device."""
    if args.threads < 1:
        msg = f"--threads must be >= 1, got {args.threads}."
        raise SystemExit(msg)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda was requested but no CUDA device is available."
        raise SystemExit(msg)
    args.out.mkdir(parents=True, exist_ok=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return None


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "step"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+local changes in step/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    import step

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    mem = _memory_gib()
    return {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_bf16_flags(),
        "cores": os.cpu_count(),
        "memory_gib": None if mem is None else round(mem, 1),
        "gpu": gpu,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "step": getattr(step, "__version__", "?"),
        "commit": _git_commit(),
        "quick": bool(args.quick),
    }


def cpu_bf16_flags() -> str:
    """The native-bf16 flags of this CPU (AMX-BF16, AVX512-BF16), or ``"none"``."""
    from step.functionality.comps.trainer._device import BF16_CPU_FLAGS, cpu_flags

    present = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    return ", ".join(present) or "none"


def machine_line(info: Mapping[str, Any]) -> str:
    mem = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
    bf16 = f"; native bf16: {info['cpu_bf16']}" if "cpu_bf16" in info else ""
    return (f"{info['date']}; {info['cpu']} ({info['cpu_capability']}{bf16}), "
            f"{info['cores']} cores"
            f"{mem}; GPU: {info['gpu']}; device {info['device']}, {info['threads']} torch "
            f"thread(s); torch {info['torch']}, step {info['step']} ({info['commit']})"
            f"{'; quick mode' if info['quick'] else ''}.")


# ------------------------------------------------------------------------ probes
def gemm_gflops(shape: tuple[int, int, int], *, dtype: torch.dtype = torch.float32,
                device: str = "cpu", repeats: int = 15, min_seconds: float = 0.02) -> float:
    """Median GFLOP/s of a dense ``(m, k) @ (k, n)`` product."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    # repeat enough products per sample that one sample lasts at least min_seconds
    t = time.perf_counter()
    a @ b
    sync(device)
    inner = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-7)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        samples.append((time.perf_counter() - t) / inner)
    return 2.0 * m * k * n / statistics.median(samples) / 1e9


def load_probe(device: str = "cpu") -> float:
    """A quick fp32 GEMM rate (GFLOP/s) recorded beside each measurement: a low value
    means other work was running on the machine at that moment."""
    return gemm_gflops((512, 512, 512), device=device, repeats=7)


# ------------------------------------------------------------------------ tables
@dataclass
class Column:
    key: str
    label: str
    fmt: str | Callable[[Any], str] = "{}"

    def render(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "–"
        if callable(self.fmt):
            return self.fmt(value)
        return self.fmt.format(value)


@dataclass
class Table:
    """One result table: printed, and written as ``<name>.csv``, ``.md`` and ``.json``."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def markdown(self, level: int = 2) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        lines.append("| " + " | ".join(c.label for c in self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(c.render(row.get(c.key)) for c in self.columns)
                         + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def rst(self) -> str:
        """The table as an RST ``csv-table`` with its notes (for the documentation)."""
        def cell(text: str) -> str:
            return '"' + _rst_escape(text).replace('"', '""') + '"'

        lines = [f".. rubric:: {_rst_escape(self.title)}", "", ".. csv-table::",
                 "   :header: " + ", ".join(cell(c.label) for c in self.columns), ""]
        for row in self.rows:
            lines.append("   " + ", ".join(cell(c.render(row.get(c.key)))
                                            for c in self.columns))
        if self.notes:
            lines.append("")
            lines += [f"* {_rst_escape(note)}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, title_justify="left")
        for c in self.columns:
            table.add_column(c.label, overflow="fold")
        for row in self.rows:
            table.add_row(*(c.render(row.get(c.key)) for c in self.columns))
        console = Console(width=160)
        console.print(table)
        for note in self.notes:
            console.print(f"  - {note}", highlight=False)

    def write_csv(self, out: Path) -> Path:
        path = out / f"{self.name}.csv"
        keys = [c.key for c in self.columns]
        extra = sorted({k for r in self.rows for k in r} - set(keys))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys + extra, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in keys + extra})
        return path


def _rst_escape(text: str) -> str:
    """Escape the characters that RST would read as markup in plain text."""
    out = str(text).replace("\\", "\\\\")
    for char in "*`|":
        out = out.replace(char, "\\" + char)
    return re.sub(r"_(?=\W|$)", r"\\_", out)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=float)
    return value


def write_report(name: str, title: str, intro: str, tables: Sequence[Table],
                 info: Mapping[str, Any], out: Path, *, extra_md: str = "",
                 extra_json: Mapping[str, Any] | None = None) -> list[Path]:
    """Print the tables and write them: one CSV per table, one Markdown page and one JSON
    file (machine, settings and every row) for the script."""
    paths = []
    for table in tables:
        table.print()
        paths.append(table.write_csv(out))
    md = [f"# {title}", "", intro.strip(), "", f"Machine: {machine_line(info)}", ""]
    md += [t.markdown() for t in tables]
    if extra_md:
        md.append(extra_md.strip() + "\n")
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(md))
    rst_path = out / f"{name}.rst"
    rst = [f"Measured {_rst_escape(machine_line(info))}", ""] + [t.rst() for t in tables]
    rst_path.write_text("\n".join(rst))
    json_path = out / f"{name}.json"
    payload = {"machine": dict(info), "tables": {t.name: t.rows for t in tables},
               **(extra_json or {})}
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    paths += [md_path, rst_path, json_path]
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                               for p in paths))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def fmt_int(value: Any) -> str:
    return f"{int(value):,}"


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{float(v):,.{digits}f}"


def fmt_ratio(value: Any) -> str:
    return f"{float(value):.2f}×"


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=float)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd


# ------------------------------------------------------------------------- data
def write_counts_h5ad(adata: Any, path: Path) -> Path:
    """Write counts, obs and obsm (not uns) for the step-kit driver."""
    import anndata as ad

    out = ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy())
    for key, value in adata.obsm.items():
        out.obsm[key] = np.asarray(value)
    out.write_h5ad(path)
    return path


# ---------------------------------------------------------------------- step-kit
class StepkitUnavailable(RuntimeError):
    pass


def stepkit_python(args: argparse.Namespace) -> Path:
    """The step-kit environment's python, or :class:`StepkitUnavailable` with a hint."""
    if args.no_stepkit:
        raise StepkitUnavailable("skipped (--no-stepkit)")
    python = Path(args.stepkit_python)
    if not python.is_file():
        raise StepkitUnavailable(
            f"no step-kit environment at {python}; create it as described in "
            "benchmarks/README.md or pass --stepkit-python")
    return python


def run_stepkit(args: argparse.Namespace, h5ad: Path, task: str, out_json: Path,
                extra: Sequence[str] = (), *, timeout: float = 3600) -> dict[str, Any]:
    """Run the step-kit driver for ``task`` in its own environment and return its JSON.

    The driver runs in a scratch working directory with a clean ``PYTHONPATH`` so that its
    ``import step`` can only find step-kit.
    """
    python = stepkit_python(args)
    cmd = [str(python), str(DRIVER), str(h5ad), "--task", task, "--out", str(out_json),
           "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed),
           *map(str, extra)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.TemporaryDirectory(prefix="stepkit-run-") as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        msg = f"step-kit driver failed ({' '.join(cmd[2:5])}):\n{tail}"
        raise RuntimeError(msg)
    return json.loads(out_json.read_text())


class ScviUnavailable(RuntimeError):
    pass


def run_scvi(python: Path, h5ad: Path, out_json: Path, *, epochs: int, seed: int,
             threads: int, timeout: float = 3600) -> dict[str, Any]:
    """Train scVI through ``peers/scvi_driver.py`` in its own environment; its JSON.

    Raises :class:`ScviUnavailable` when that environment does not exist.
    """
    if not Path(python).is_file():
        raise ScviUnavailable(
            f"no scVI environment at {python}; create it as described in "
            "benchmarks/README.md or pass --scvi-python")
    cmd = [str(python), str(SCVI_DRIVER), str(h5ad), "--epochs", str(epochs), "--seed",
           str(seed), "--threads", str(threads), "--out", str(out_json)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.TemporaryDirectory(prefix="scvi-run-") as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        msg = f"scVI driver failed:\n{(proc.stderr or proc.stdout)[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(out_json.read_text())


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


#: Bytes in a GiB, for the memory tables.
GiB = 2**30


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (``getrusage`` reports KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(value: Any) -> str:
    """Bytes as GiB with two decimals."""
    return f"{float(value) / GiB:.2f}"


def run_json_child(cmd: list[str], threads: int, what: str,
                   env: dict[str, str] | None = None) -> Any:
    """Run ``cmd`` in a fresh process and return the last JSON line it prints; ``what``
    names the run in the error raised when the process fails."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**child_env(threads), **(env or {})})
    if proc.returncode != 0:
        msg = f"{what} failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))][-1])


def python_exe() -> str:
    return sys.executable


# ---------------------------------------------------------------- timing helpers
class StepClock:
    """Trainer callback recording the time at the end of every optimizer step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def on_train_batch_end(self, **_: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())


#: Operator name fragments grouped into parts of a training step (first match wins).
PROFILE_PARTS = (
    ("dense matrix products (mm, addmm)", ("aten::mm", "aten::addmm")),
    ("attention (fused kernel, or bmm and softmax)", ("aten::bmm", "softmax", "FusedAttention")),
    ("feed-forward bias and GELU (fused kernel, or gelu)", ("FusedBiasGelu", "aten::gelu")),
    ("graph message passing (scatter, index, sparse)", ("scatter", "index", "sparse", "gather",
                                                         "segment")),
    ("likelihood (fused kernel, or its special functions)", ("FusedCountLogProb", "digamma",
                                                             "lgamma", "polygamma")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::clone", "contiguous", "aten::cat")),
    ("optimizer", ("adam", "Optimizer")),
)


def part_of(op: str) -> str:
    """The part of a training step (``PROFILE_PARTS``) that an operator belongs to."""
    for part, keys in PROFILE_PARTS:
        if any(key.lower() in op.lower() for key in keys):
            return part
    return "other elementwise and bookkeeping"


def profile_parts(rows: list[dict]) -> list[dict]:
    """Rows of :func:`profile_rows` (all of them, not a top few) summed by part of the step,
    largest first."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        acc = sums.setdefault(part_of(row["op"]), [0.0, 0.0])
        acc[0] += row["self_ms_per_step"]
        acc[1] += row["share"]
    return [{"part": part, "self_ms_per_step": ms, "share": share}
            for part, (ms, share) in sorted(sums.items(), key=lambda item: -item[1][0])]


def profile_rows(events: Any, steps: int, limit: int | None = None) -> tuple[list[dict], float]:
    """Operators of a ``torch.profiler`` run by self CPU time per step (the ``limit`` largest),
    and the total self time per step in ms."""
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    rows = [{"op": e.key, "calls_per_step": e.count / steps,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in ranked]
    return rows, total / 1e3 / steps


# ------------------------------------------------------ attention comparison
class pytorch_attention:  # noqa: N801 - used as a context manager
    """Make the library's encoder layers use PyTorch's own attention while the context is
    active (in this process only).

    On CPUs the library computes self-attention with its fused kernel (heads of 4 or 8
    dimensions, in full precision and under bf16 autocast) or as two batched matmuls and
    a softmax (``step.models._blocks._EncoderLayer._attention``, called in training and
    in evaluation); with 33 tokens and heads of 8-16 dimensions either is faster than
    PyTorch's CPU flash-attention kernel, above all under bf16 autocast. This context
    makes ``_attention`` call the layer's ``nn.MultiheadAttention`` instead, so the
    benchmarks can show the difference in the same run.
    """

    def __enter__(self) -> pytorch_attention:
        from step.models._blocks import _EncoderLayer

        def through_pytorch(layer: Any, x: torch.Tensor) -> torch.Tensor:
            return layer.self_attn(x, x, x, need_weights=False)[0]

        self._shipped = _EncoderLayer.__dict__["_attention"]
        _EncoderLayer._attention = through_pytorch
        return self

    def __exit__(self, *exc: Any) -> None:
        from step.models._blocks import _EncoderLayer

        _EncoderLayer._attention = self._shipped


class elementwise_likelihood:  # noqa: N801 - used as a context manager
    """Make the decoder compute its likelihood with the elementwise formulas of
    ``step.models._likelihoods`` (and autograd) instead of the fused CPU kernel while the
    context is active (in this process only), so the benchmarks can show the difference
    in the same run."""

    def __enter__(self) -> elementwise_likelihood:
        from step.models import _blocks

        self._shipped = _blocks._fused_likelihood_applies
        _blocks._fused_likelihood_applies = lambda x, params: False
        return self

    def __exit__(self, *exc: Any) -> None:
        from step.models import _blocks

        _blocks._fused_likelihood_applies = self._shipped


def with_seed(args: Any, seed: int) -> Any:
    """A copy of the parsed arguments with another seed."""
    import copy

    out = copy.copy(args)
    out.seed = seed
    return out


def doc_intro(doc: str | None) -> str:
    """A script's docstring up to its usage section, with RST literals as Markdown code."""
    text = (doc or "").split("Usage::")[0].strip()
    return text.replace("``", "`")
