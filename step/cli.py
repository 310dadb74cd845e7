"""Command line: ``step fit`` trains a workflow on .h5ad files or .zarr stores, ``step demo``
on PBMCs.

Every command writes into one output folder::

    OUT/result.h5ad        the input AnnData with the workflow's result keys
    OUT/run/               model.pt, config.json, history.csv, checkpoints/checkpoint.pt
    OUT/figures/           loss_curves.png, umap.png (and spatial_domains.png)

All arguments, the input file, the checkpoint to resume and the output folder are
checked before training; a problem ends the command with one line ``step: error: ...``
and exit status 2 (``--debug`` shows the traceback instead). Training that diverges
ends with status 1 and writes no results; so does an input file that cannot be read any
more during training, after saving the state of the last completed epoch. Ctrl-C or SIGTERM during training saves a
checkpoint and exits with status 130, printing the command that resumes the run.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["OUTPUT_FILES", "build_parser", "main", "resume_command"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Defaults of ``step demo``: well under a minute of training on two CPU cores. The
#: small model with a 10-dimensional latent space and a KL weight of 0.3 separates the
#: PBMC types better than the package defaults on these 700 cells.
DEMO_EPOCHS = 100
DEMO_THREADS = 1
DEMO_ARCH = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "latent_dim": 10,
             "kl_weight": 0.3, "dropout": 0.0}
#: The demo trains in fp32 on every machine: with its small model and batches of 32,
#: bf16 gave clusters that agree less with the labels (ARI at 10 clusters, seeds 0-2 on
#: a CPU with AVX512-BF16: 0.426 / 0.486 / 0.479 against 0.498 / 0.586 / 0.496 in fp32).
DEMO_PRECISION = "fp32"
#: Every file ``step`` writes into the output folder (relative paths), and its folders.
#: ``--overwrite`` removes these and nothing else.
OUTPUT_FILES = ("result.h5ad", "run/model.pt", "run/config.json", "run/history.csv",
                "run/checkpoints/checkpoint.pt", "figures/loss_curves.png",
                "figures/umap.png", "figures/spatial_domains.png")
OUTPUT_DIRS = ("run", "run/checkpoints", "figures")
CHECKPOINT = "run/checkpoints/checkpoint.pt"
#: Most cells drawn in the UMAP figure of a --backed run (a random subset above it):
#: the neighbour graph and UMAP of millions of cells take hours on a CPU.
UMAP_MAX_CELLS = 100_000
# defaults of the spatial-only options (None on the parser, to tell whether they were given)
_SPATIAL_DEFAULTS = {"section_key": None, "spatial_key": "spatial", "n_clusters": None,
                     "mode": "two-stage", "graph_epochs": 50, "k": 6}


class UsageError(Exception):
    """A bad argument, input file, checkpoint or output folder (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line ``step: error: ...`` (status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"step: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------ argument types
def _integer(text: str, *, minimum: int, what: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected {what}, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < minimum or (maximum is not None and value > maximum):
        msg = f"expected {what}, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    return _integer(text, minimum=1, what="a positive integer")


def _non_negative_int(text: str) -> int:
    return _integer(text, minimum=0, what="an integer >= 0")


def _seed(text: str) -> int:
    return _integer(text, minimum=0, maximum=2**32 - 1,
                    what=f"an integer in [0, {2**32 - 1}]")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not (math.isfinite(value) and value > 0):
        msg = f"expected a positive finite number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of a previous run in --out (only the files "
                             "step writes are removed)")
    parser.add_argument("--quiet", action="store_true", help="no live progress display")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=_positive_int, default=100,
                       help="most epochs of the first stage (default: %(default)s)")
    group.add_argument("--batch-size", type=_positive_int, default=128,
                       help="cells per mini-batch (default: %(default)s)")
    group.add_argument("--lr", type=_positive_float, default=1e-3,
                       help="learning rate, a positive finite number (default: %(default)s)")
    group.add_argument("--seed", type=_seed, default=0,
                       help="random seed in [0, 2**32) (default: %(default)s)")
    group.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                       default="auto",
                       help="arithmetic of training: auto is bf16 where the CPU or GPU computes "
                            "it natively and fp32 elsewhere (default: %(default)s)")
    group.add_argument("--steps-per-epoch", type=_positive_int, metavar="N",
                       help="end each epoch after N mini-batches, so that validation, "
                            "checkpoints and --resume happen every N steps (for large data; "
                            "default: one full pass)")
    group.add_argument("--block-size", type=_positive_int, metavar="ROWS",
                       help="shuffle contiguous blocks of ROWS rows instead of single rows, so "
                            "that batches read from disk touch few ranges (default: rows)")
    group.add_argument("--buffer-blocks", type=_positive_int, default=16, metavar="N",
                       help="blocks whose rows are shuffled together with --block-size "
                            "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``step`` argument parser with its ``fit`` and ``demo`` sub-commands."""
    parser = _Parser(
        prog="step", allow_abbrev=False,
        description="Train TranscriptFormer on single-cell or spatial counts stored as AnnData.",
        epilog="Run 'step COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser(
        "fit", help="train on .h5ad files or .zarr stores and write results, model and figures",
        allow_abbrev=False,
        description=(
            "Train a workflow on INPUT (raw integer counts in X or in --layer) and write "
            "OUT/result.h5ad (obsm X_rep; with --class-key and --refine-epochs also "
            "X_anchord; with --spatial also X_smoothed and obs domain), the model in "
            "OUT/run and figures in OUT/figures. Several inputs, or .zarr stores, are one "
            "collection read from disk (rows concatenated in order, genes matched by "
            "name, cell names unique across the files)."),
    )
    fit.add_argument("input", nargs="+", metavar="INPUT",
                     help="AnnData .h5ad file or .zarr store with raw counts; several are "
                          "read from disk as one collection")
    fit.add_argument("--out", required=True, metavar="DIR", help="output folder")
    data = fit.add_argument_group("data")
    data.add_argument("--layer", help="layer with the counts (default: X)")
    data.add_argument("--batch-key", help="obs column with batches")
    data.add_argument("--class-key", help="obs column with cell labels (stratifies the "
                      "validation split; needed by --refine-epochs)")
    data.add_argument("--n-top-genes", type=_positive_int,
                      help="keep this many highly variable genes (default: all; from disk "
                      "they are selected in one pass over the counts)")
    data.add_argument("--genes", metavar="FILE",
                      help="train on the genes listed in FILE, one name per line, in that "
                      "order (with --n-top-genes: select among them)")
    data.add_argument("--backed", action="store_true",
                      help="leave the counts of an .h5ad file on disk and read them in "
                      "mini-batches (for data larger than memory; CSR counts, not with "
                      "--spatial; always so for several inputs and .zarr stores); "
                      "result.h5ad then holds obs, var and obsm without the counts, its "
                      "embedding written block by block; figures/umap.png shows at most "
                      f"{UMAP_MAX_CELLS:,} cells drawn at random")
    data.add_argument("--copy-counts", action="store_true",
                      help="with --backed, copy the counts into result.h5ad, from file to "
                      "file without reading them into memory")
    spatial = fit.add_argument_group("spatial (only with --spatial)")
    spatial.add_argument("--spatial", action="store_true",
                         help="spatial workflow: smooth over neighbour graphs, find domains")
    spatial.add_argument("--section-key", help="obs column with the section of each spot")
    spatial.add_argument("--spatial-key",
                         help="obsm entry with coordinates (default: spatial)")
    spatial.add_argument("--n-clusters", type=_positive_int,
                         help="number of spatial domains (required with --spatial)")
    spatial.add_argument("--mode", choices=("two-stage", "end-to-end"),
                         help="spatial training mode (default: two-stage)")
    spatial.add_argument("--graph-epochs", type=_positive_int,
                         help="epochs of the graph stage (default: 50)")
    spatial.add_argument("--k", type=_positive_int, help="neighbours per spot (default: 6)")
    _add_training_options(fit)
    fit.add_argument("--refine-epochs", type=_non_negative_int, default=0,
                     help="label refinement epochs after training (needs --class-key; "
                          "default: %(default)s)")
    _add_common_options(fit)

    demo = sub.add_parser(
        "demo", help="embed the 700 PBMCs shipped with scanpy and draw the figures",
        allow_abbrev=False,
        description=(
            "Train a small TranscriptFormer on the PBMC counts of "
            "step.datasets.pbmc68k_counts() (labels: bulk_labels) and write the same "
            "outputs as 'step fit'. Trains on one CPU thread, the fastest choice for this "
            "small model and its mini-batches of 32 cells: under a minute on a laptop CPU."),
    )
    demo.add_argument("--out", default="step-demo", metavar="DIR",
                      help="output folder (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS,
                      help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="random seed in [0, 2**32) (default: %(default)s)")
    _add_common_options(demo)
    return parser


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- checks before training
def _check_spatial_options(args: argparse.Namespace) -> None:
    """Spatial options need --spatial; fill in their defaults."""
    given = [name for name, default in _SPATIAL_DEFAULTS.items()
             if getattr(args, name) is not None]
    if not args.spatial:
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            msg = f"{flags} only apply with --spatial"
            raise UsageError(msg)
        return
    for name, default in _SPATIAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.n_clusters is None:
        msg = "--spatial needs --n-clusters (the number of domains to find)"
        raise UsageError(msg)
    if args.refine_epochs:
        msg = "--refine-epochs is for single-cell data; it does not apply with --spatial"
        raise UsageError(msg)
    for flag in ("steps_per_epoch", "block_size", "genes"):
        if getattr(args, flag) is not None:
            msg = f"--{flag.replace('_', '-')} is for single-cell data; it does not apply with --spatial"
            raise UsageError(msg)


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        msg = f"--device must be cpu, cuda, cuda:<n> or auto, got {device!r}"
        raise UsageError(msg) from None
    if resolved.type not in ("cpu", "cuda"):
        msg = f"--device must be cpu, cuda, cuda:<n> or auto, got {device!r}"
        raise UsageError(msg)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"--device {device} was requested but CUDA is not available; use cpu or auto"
        raise UsageError(msg)


def _check_input(path: str) -> Path:
    import h5py

    file = Path(path)
    if not file.exists():
        msg = f"input file {path!r} does not exist"
        raise UsageError(msg)
    if file.suffix == ".zarr" or file.is_dir():
        if not (file.is_dir() and any((file / m).is_file() for m in (".zgroup", "zarr.json"))):
            msg = f"input {path!r} is a folder, not an .h5ad file or a .zarr store"
            raise UsageError(msg)
        return file
    if not h5py.is_hdf5(file):
        msg = (f"input {path!r} is not an .h5ad file (not HDF5; a CSV or .loom file renamed "
               ".h5ad?); convert it with anndata first")
        raise UsageError(msg)
    return file


def _read_gene_list(path: str | None) -> list[str] | None:
    """The names in a text file, one per line (blank lines skipped)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        msg = f"--genes: cannot read {path!r}: {err}"
        raise UsageError(msg) from err
    genes = [line.strip() for line in text.splitlines() if line.strip()]
    if not genes:
        msg = f"--genes: {path!r} lists no gene names (expected one name per line)"
        raise UsageError(msg)
    repeated = sorted({g for g in genes if genes.count(g) > 1})
    if repeated:
        msg = f"--genes: {path!r} lists genes more than once: {', '.join(repeated[:10])}"
        raise UsageError(msg)
    return genes


def _check_resume_file(path: str | None) -> Path | None:
    if path is None:
        return None
    from step.functionality.comps.trainer import read_checkpoint

    try:
        read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--resume: {err}") from err
    return Path(path)


def _owned(out: Path) -> tuple[set[Path], set[Path]]:
    """The files and folders ``step`` writes into ``out``."""
    files = {out / f for f in OUTPUT_FILES}
    return files, {out / d for d in OUTPUT_DIRS}


def _is_temporary(path: Path, files: set[Path]) -> bool:
    """A temporary file of an interrupted atomic write of one of ``files``."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and any(
        path.parent == f.parent and path.name.startswith(f".{f.name}.") for f in files)


def _check_out(out: Path, *, overwrite: bool, resume: Path | None) -> list[Path]:
    """Check the output folder before training; return the files to remove first.

    A folder holding a previous run is refused unless ``overwrite`` or unless the run
    resumes that folder's own checkpoint; a folder holding files ``step`` did not write
    is always refused.
    """
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under {str(parent)!r}, a file"
            msg = f"--out {str(out)!r} {where}; choose a folder"
            raise UsageError(msg)
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                msg = f"--out {str(out)!r}: {str(parent)!r} is not writable"
                raise UsageError(msg)
            break
    if not out.exists():
        return []
    files, folders = _owned(out)
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            msg = (f"{str(folder)!r} is a file where step writes a folder; remove it or "
                   "choose another --out")
            raise UsageError(msg)
    present, foreign = [], []
    for path in sorted(out.rglob("*")):
        if path in folders:
            continue
        if path in files and path.is_file():
            present.append(path)
        elif path.is_file() and _is_temporary(path, files):
            present.append(path)
        else:
            foreign.append(path)
    if foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        msg = (f"--out {str(out)!r} holds files step did not write ({shown}{more}); "
               "choose an empty or new folder")
        raise UsageError(msg)
    own_checkpoint = out / CHECKPOINT
    resumes_here = resume is not None and own_checkpoint.exists() and (
        os.path.samefile(resume, own_checkpoint))
    if present and not (overwrite or resumes_here):
        shown = ", ".join(str(p.relative_to(out)) for p in present[:4])
        more = f" and {len(present) - 4} more" if len(present) > 4 else ""
        msg = (f"--out {str(out)!r} holds a previous run ({shown}{more}); pass --overwrite "
               "to replace it, or choose another folder")
        raise UsageError(msg)
    keep = own_checkpoint if resumes_here else None
    return [p for p in present if p != keep]


def _prepare_out(out: Path, stale: Sequence[Path]) -> Path:
    """Remove the previous run's files and create the folders; return the checkpoint folder."""
    for path in stale:
        path.unlink()
    for folder in OUTPUT_DIRS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    return out / "run" / "checkpoints"


def _read_input(path: Path, *, backed: bool = False) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - h5py and anndata raise many types
        msg = f"cannot read {str(path)!r} as AnnData: {type(err).__name__}: {err}"
        raise UsageError(msg) from err


def _message(err: BaseException) -> str:
    """The text of an exception (a KeyError's without the quotes repr adds)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err)


# ------------------------------------------------------------------------- outputs
def _write_h5ad(adata: Any, path: Path) -> None:
    """Write an .h5ad file through a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _figures(adata: Any, history: Any, out: Path, *, use_rep: str, color: list[str],
             spatial: dict[str, Any] | None, seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from step.workflows.figures import plot_loss_curves, plot_spatial, plot_umap

    folder = out / "figures"
    written = [plot_loss_curves(history, folder / "loss_curves.png"),
               plot_umap(adata, folder / "umap.png", use_rep=use_rep, color=color, seed=seed)]
    if spatial is not None:
        written.append(plot_spatial(adata, folder / "spatial_domains.png", **spatial))
    return written


def _finish(model: Any, adata: Any, out: Path, *, use_rep: str, color: list[str],
            spatial: dict[str, Any] | None, seed: int) -> None:
    run_dir = model.save(out / "run")
    _write_h5ad(adata, out / "result.h5ad")
    figures = _figures(adata, model.history, out, use_rep=use_rep, color=color,
                       spatial=spatial, seed=seed)
    _say(f"results: {out / 'result.h5ad'}")
    _say(f"model:   {run_dir}")
    _say("figures: " + ", ".join(str(p) for p in figures))


# ------------------------------------------------------------------------ commands
def _build(factory: Any, adata: Any, **kwargs: Any) -> Any:
    """Create a workflow; its input errors (and unreadable files) become usage errors."""
    try:
        return factory(adata, **kwargs)
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise UsageError(_message(err)) from err


def _check_resume_fits(model: Any, resume: Path | None, **kwargs: Any) -> None:
    if resume is None:
        return
    try:
        model.check_resume(resume, **kwargs)
    except ValueError as err:
        raise UsageError(f"--resume: {err}") from err


def _fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_spatial_options(args)
    if args.refine_epochs and not args.class_key:
        msg = "--refine-epochs needs --class-key (the obs column with cell labels)"
        raise UsageError(msg)
    paths = [_check_input(p) for p in args.input]
    # several inputs and zarr stores are always read from disk
    args.backed = args.backed or len(paths) > 1 or any(p.is_dir() for p in paths)
    if args.backed and args.spatial:
        msg = "reading from disk (--backed, several inputs, .zarr) is for single-cell data, not --spatial"
        raise UsageError(msg)
    if args.copy_counts and not args.backed:
        msg = "--copy-counts applies with --backed (without it result.h5ad holds the counts)"
        raise UsageError(msg)
    if args.copy_counts and (len(paths) > 1 or args.n_top_genes or args.genes):
        # checked now rather than after training: the copy keeps one file's cells and genes
        msg = ("--copy-counts needs one input file trained on all of its genes (not several "
               "inputs, --n-top-genes or --genes)")
        raise UsageError(msg)
    _check_device(args.device)
    genes = _read_gene_list(args.genes)
    resume = _check_resume_file(args.resume)
    stale = _check_out(out, overwrite=args.overwrite, resume=resume)
    if len(paths) > 1 or paths[0].is_dir():
        adata = [str(p) for p in paths]
    else:
        adata = _read_input(paths[0], backed=args.backed)
    if args.spatial and args.n_clusters > adata.n_obs:
        msg = f"--n-clusters {args.n_clusters} exceeds the {adata.n_obs} spots of {args.input[0]!r}"
        raise UsageError(msg)
    common = dict(layer=args.layer, batch_key=args.batch_key, n_top_genes=args.n_top_genes,
                  seed=args.seed, device=args.device)
    if genes is not None:
        common["genes"] = genes
    color = [k for k in (args.class_key, args.batch_key) if k]
    if args.spatial:
        from step.workflows import stModel

        model = _build(stModel, adata, section_key=args.section_key,
                       spatial_key=args.spatial_key, k=args.k, **common)
        _check_resume_fits(model, resume, mode=args.mode)
        if args.class_key and args.class_key not in adata.obs.columns:
            msg = f"--class-key {args.class_key!r} is not an obs column of {args.input[0]!r}"
            raise UsageError(msg)
    else:
        from step.workflows import scModel

        model = _build(scModel, adata, class_key=args.class_key, **common)
        adata = model.adata  # for paths: the files' obs and genes, without counts
        _check_resume_fits(model, resume)
    checkpoints = _prepare_out(out, stale)
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 precision=args.precision, checkpoint_dir=checkpoints, resume=resume,
                 verbose=not args.quiet)
    if args.spatial:
        _train(model.run, checkpoints, mode=args.mode, graph_epochs=args.graph_epochs, **train)
        model.cluster(args.n_clusters)
        color = ["domain", *[c for c in color if c != "domain"]]
        if args.section_key:
            color.append(args.section_key)
        spatial = {"color": "domain", "spatial_key": args.spatial_key,
                   "section_key": args.section_key}
        _finish(model, adata, out, use_rep="X_smoothed", color=color, spatial=spatial,
                seed=args.seed)
        return 0
    train.update(steps_per_epoch=args.steps_per_epoch, block_size=args.block_size,
                 buffer_blocks=args.buffer_blocks)
    if args.backed:
        _fit_backed(model, adata, out, args, checkpoints, train, color)
        return 0
    _train(model.run, checkpoints, **train)
    if args.refine_epochs > 0:
        _train(model.refine, checkpoints, epochs=args.refine_epochs, verbose=not args.quiet,
               resumable=False)
    _finish(model, adata, out, use_rep="X_rep", color=color, spatial=None, seed=args.seed)
    return 0


class _ReadFailedError(Exception):
    """Reading an input file failed during training; the last epoch's state was saved."""

    def __init__(self, checkpoint: Path, error: OSError) -> None:
        super().__init__(str(error))
        self.checkpoint = checkpoint


def _fit_backed(model: Any, adata: Any, out: Path, args: argparse.Namespace,
                checkpoints: Path, train: dict[str, Any], color: list[str]) -> None:
    """Train from disk and stream the embeddings into result.h5ad, never holding the
    counts or the whole embedding in memory (refinement computes its anchors from the
    embedding in memory)."""
    from step.functionality.comps.trainer import NonFiniteError
    from step.utils import embed_to_h5ad

    result = out / "result.h5ad"
    tmp = result.with_name(f".{result.name}.tmp")
    try:
        _train(model.run, checkpoints, key_added=None, **train)
        embed_to_h5ad(model.model, model.dataset, tmp, obs=adata.obs, var=adata.var,
                      uns=adata.uns, copy_counts=args.copy_counts)
        if args.refine_epochs > 0:
            _train(model.refine, checkpoints, epochs=args.refine_epochs,
                   verbose=not args.quiet, resumable=False)
            embed_to_h5ad(model.model, model.dataset, tmp, outputs={"X_anchord": "anchored"},
                          append=True)
        os.replace(tmp, result)
    except FloatingPointError as err:
        raise NonFiniteError(str(err)) from err
    finally:
        tmp.unlink(missing_ok=True)
    run_dir = model.save(out / "run")
    figures = _backed_figures(result, model.history, out, color=color, seed=args.seed)
    _say(f"results: {result}")
    _say(f"model:   {run_dir}")
    _say("figures: " + ", ".join(str(p) for p in figures))


def _backed_figures(result: Path, history: Any, out: Path, *, color: list[str],
                    seed: int) -> list[Path]:
    """The figures of a --backed run from its result file: obs and the embedding of at
    most :data:`UMAP_MAX_CELLS` cells, drawn at random, are read into memory."""
    import anndata as ad
    import h5py
    import numpy as np
    from anndata.io import read_elem

    with h5py.File(result, "r") as file:
        obs = read_elem(file["obs"])
        rep = file["obsm/X_rep"]
        if len(obs) > UMAP_MAX_CELLS:
            rows = np.sort(np.random.default_rng(seed).choice(len(obs), UMAP_MAX_CELLS,
                                                              replace=False))
            _say(f"figures: UMAP of {UMAP_MAX_CELLS:,} of the {len(obs):,} cells, drawn at "
                 "random")
            sample = ad.AnnData(obs=obs.iloc[rows].copy(), obsm={"X_rep": rep[rows]})
        else:
            sample = ad.AnnData(obs=obs, obsm={"X_rep": rep[:]})
    return _figures(sample, history, out, use_rep="X_rep", color=color, spatial=None,
                    seed=seed)


class _InterruptedError(Exception):
    def __init__(self, checkpoint: Path, *, resumable: bool = True) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint
        self.resumable = resumable


def _train(step_fn: Any, checkpoints: Path, *, threads: int | None = None,
           resumable: bool = True, **kwargs: Any) -> Any:
    """Run a training call; turn Ctrl-C/SIGTERM into :class:`_InterruptedError` and the
    input errors that the workflows raise before training into :class:`UsageError`."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        return step_fn(**kwargs)
    except KeyboardInterrupt:
        raise _InterruptedError(checkpoints / "checkpoint.pt", resumable=resumable) from None
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(_message(err)) from err
    except OSError as err:  # an input file damaged while training
        if not resumable:
            raise
        raise _ReadFailedError(checkpoints / "checkpoint.pt", err) from err


def _demo(args: argparse.Namespace) -> int:
    from step.datasets import pbmc68k_counts
    from step.workflows import scModel

    out = Path(args.out)
    resume = _check_resume_file(args.resume)
    stale = _check_out(out, overwrite=args.overwrite, resume=resume)
    adata = pbmc68k_counts()
    model = scModel(adata, class_key="bulk_labels", seed=args.seed, **DEMO_ARCH)
    _check_resume_fits(model, resume)
    checkpoints = _prepare_out(out, stale)
    _train(model.run, checkpoints, threads=DEMO_THREADS, epochs=args.epochs, batch_size=32,
           lr=1e-3, precision=DEMO_PRECISION, checkpoint_dir=checkpoints, resume=resume,
           verbose=not args.quiet)
    _report_clusters(adata, "bulk_labels")
    _finish(model, adata, out, use_rep="X_rep", color=["bulk_labels"], spatial=None,
            seed=args.seed)
    return 0


def _report_clusters(adata: Any, label_key: str) -> None:
    """Print how well Leiden clusters of the embedding match the known labels."""
    from sklearn.metrics import adjusted_rand_score

    from step.workflows._cluster import leiden_for_n_clusters

    labels = adata.obs[label_key].to_numpy()
    n_labels = len(set(labels))
    clusters, resolution = leiden_for_n_clusters(adata.obsm["X_rep"], n_labels)
    ari = adjusted_rand_score(labels, clusters)
    _say(f"Leiden clusters of X_rep ({len(set(clusters))} at resolution {resolution:.3g}) vs "
         f"{label_key}: ARI {ari:.3f}")


def resume_command(argv: Sequence[str], checkpoint: Path) -> str:
    """The command line that continues an interrupted run from ``checkpoint``.

    Parameters
    ----------
    argv
        Arguments of the interrupted command, without the program name.
    checkpoint
        The checkpoint it saved.

    Returns
    -------
    ``step ...`` with the same arguments, ``--overwrite`` and any ``--resume`` removed,
    and ``--resume checkpoint`` added, quoted for a POSIX shell.
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume=") or arg == "--overwrite":
            continue
        kept.append(arg)
    return shlex.join(["step", *kept, "--resume", os.fspath(checkpoint)])


def _completed_epochs(checkpoint: Path) -> int | None:
    """How many epochs the saved state has completed (``None`` when unreadable)."""
    from step.functionality.comps.trainer import read_checkpoint

    try:
        epoch = read_checkpoint(checkpoint)["counters"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(epoch) if isinstance(epoch, int) else None


def _report_interrupt(stop: _InterruptedError, argv: Sequence[str]) -> None:
    if not stop.resumable:
        _say("interrupted during --refine-epochs; refinement cannot be resumed: run the "
             "command again with --overwrite")
        return
    if not stop.checkpoint.is_file():
        _say("interrupted before a checkpoint could be written; nothing to resume")
        return
    done = _completed_epochs(stop.checkpoint)
    after = "" if done is None else f" after {done} completed epoch{'s' * (done != 1)}"
    _say(f"interrupted: the training state{after} was saved to {stop.checkpoint}")
    _say(f"continue with: {resume_command(argv, stop.checkpoint)}")


def _report_read_failure(failure: _ReadFailedError, argv: Sequence[str]) -> None:
    _say(f"step: error: {failure}")
    done = _completed_epochs(failure.checkpoint) if failure.checkpoint.is_file() else None
    if done is None:
        _say("no training state was saved; run the command again once the file is restored")
        return
    _say(f"the training state after {done} completed epoch{'s' * (done != 1)} was saved to "
         f"{failure.checkpoint}")
    _say(f"once the file is restored, continue with: {resume_command(argv, failure.checkpoint)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``step`` command line; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    0 on success, 1 when training diverged (no results are written) or an input file
    could not be read during training (the last epoch's state is kept), 2 for a bad
    argument, input file, checkpoint or output folder, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    handler = _fit if args.command == "fit" else _demo
    from step.functionality.comps.trainer import NonFiniteError

    try:
        return handler(args)
    except UsageError as err:
        if args.debug:
            raise
        _say(f"step: error: {err}")
        return EXIT_USAGE
    except NonFiniteError as err:
        if args.debug:
            raise
        _say(f"step: error: training diverged, no results were written: {err}")
        return EXIT_FAILED
    except _InterruptedError as stop:
        _report_interrupt(stop, argv)
        return EXIT_INTERRUPTED
    except _ReadFailedError as failure:
        if args.debug:
            raise
        _report_read_failure(failure, argv)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
