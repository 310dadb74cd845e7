"""The ``step`` command line: fit on .h5ad files and .zarr stores, the demo, help and
interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from step import cli

SMALL_ARCH = {"hidden_dim": 32, "n_modules": 16, "module_dim": 16, "latent_dim": 16,
              "dropout": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded training (faster on a busy machine); scanpy and scikit-learn reset
    torch's OpenMP pool through threadpoolctl, so set it for every test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_outputs(out: Path, adata_in: ad.AnnData, *, obsm: set[str],
                   obs: frozenset[str] = frozenset()) -> ad.AnnData:
    result = ad.read_h5ad(out / "result.h5ad")
    assert result.n_obs == adata_in.n_obs
    assert set(result.obsm) - set(adata_in.obsm) == obsm
    assert set(result.obs.columns) - set(adata_in.obs.columns) == obs
    assert set(result.uns) == set(adata_in.uns)
    rep = result.obsm["X_rep"]
    assert rep.shape[0] == adata_in.n_obs and np.isfinite(rep).all()
    run = out / "run"
    assert {"model.pt", "config.json", "history.csv"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "checkpoint.pt").is_file()
    assert _png(out / "figures" / "loss_curves.png")
    assert _png(out / "figures" / "umap.png")
    return result


@pytest.fixture
def small_h5ad(pbmc_counts: ad.AnnData, tmp_path: Path) -> tuple[Path, ad.AnnData]:
    adata = pbmc_counts[:240].copy()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b0")
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    return path, adata


@pytest.fixture
def small_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI build small models so that the tests take seconds."""
    from step.workflows import scModel, stModel

    for cls in (scModel, stModel):
        original = cls.__init__

        def init(self, adata, *, _original=original, **kw):
            _original(self, adata, **{**kw, **SMALL_ARCH})

        monkeypatch.setattr(cls, "__init__", init)


def test_help_everywhere() -> None:
    for argv in (["--help"], ["fit", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 0


@pytest.mark.usefixtures("small_arch")
def test_fit_single_cell(small_h5ad, tmp_path: Path, capsys) -> None:
    path, adata = small_h5ad
    out = tmp_path / "out"
    code = cli.main(["fit", str(path), "--out", str(out), "--class-key", "bulk_labels",
                     "--batch-key", "batch", "--epochs", "3", "--refine-epochs", "2",
                     "--quiet"])
    assert code == 0
    _check_outputs(out, adata, obsm={"X_rep", "X_anchord"})
    assert "result.h5ad" in capsys.readouterr().err


@pytest.mark.usefixtures("small_arch")
def test_fit_passes_the_precision_to_training(small_h5ad, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from step.workflows import scModel

    chosen = []
    original = scModel.run

    def run(self, *args, **kw):
        out = original(self, *args, **kw)
        chosen.append((kw.get("precision"), self.trainer.precision))
        return out

    monkeypatch.setattr(scModel, "run", run)
    path, _ = small_h5ad
    for i, extra in enumerate((["--precision", "fp32"], [])):
        assert cli.main(["fit", str(path), "--out", str(tmp_path / f"o{i}"), "--epochs", "1",
                         "--quiet", *extra]) == 0
    from step.functionality.comps.trainer._device import native_bf16

    assert chosen[0] == ("fp32", "fp32")
    assert chosen[1] == ("auto", "bf16" if native_bf16(torch.device("cpu")) else "fp32")
    with pytest.raises(SystemExit):
        cli.main(["fit", str(path), "--out", str(tmp_path / "o3"), "--precision", "half"])


@pytest.mark.usefixtures("small_arch")
def test_fit_backed_reads_counts_from_disk(small_h5ad, tmp_path: Path) -> None:
    path, adata = small_h5ad
    out = tmp_path / "out"
    code = cli.main(["fit", str(path), "--out", str(out), "--backed", "--class-key",
                     "bulk_labels", "--batch-key", "batch", "--epochs", "2", "--refine-epochs",
                     "1", "--quiet"])
    assert code == 0
    result = _check_outputs(out, adata, obsm={"X_rep", "X_anchord"})
    assert result.X is None and list(result.var_names) == list(adata.var_names)


@pytest.mark.usefixtures("small_arch")
def test_fit_backed_selects_genes_and_reads_a_gene_list(small_h5ad, tmp_path: Path) -> None:
    from step.utils.preprocess import prepare_counts

    path, adata = small_h5ad
    out = tmp_path / "top"
    assert cli.main(["fit", str(path), "--out", str(out), "--backed", "--n-top-genes", "50",
                     "--epochs", "1", "--quiet"]) == 0
    config = (out / "run" / "config.json").read_text()
    expected = list(prepare_counts(adata, n_top_genes=50).var_names)
    assert json.loads(config)["genes"] == expected
    listed = tmp_path / "genes.txt"
    listed.write_text("\n".join(adata.var_names[[5, 1, 9]]) + "\n\n")
    out = tmp_path / "listed"
    assert cli.main(["fit", str(path), "--out", str(out), "--genes", str(listed),
                     "--epochs", "1", "--quiet"]) == 0
    assert json.loads((out / "run" / "config.json").read_text())["genes"] == list(
        adata.var_names[[5, 1, 9]])


@pytest.mark.usefixtures("small_arch")
def test_fit_an_h5ad_and_a_zarr_equals_fitting_their_concatenation(small_h5ad,
                                                                  tmp_path: Path) -> None:
    _, adata = small_h5ad
    first, second = adata[:100].copy(), adata[100:].copy()
    first.write_h5ad(tmp_path / "first.h5ad")
    second[:, second.var_names[::-1]].copy().write_zarr(tmp_path / "second.zarr")
    args = ["--batch-key", "batch", "--class-key", "bulk_labels", "--epochs", "2",
            "--block-size", "8", "--quiet"]
    out = tmp_path / "disk"
    assert cli.main(["fit", str(tmp_path / "first.h5ad"), str(tmp_path / "second.zarr"),
                     "--out", str(out), *args]) == 0
    assert cli.main(["fit", str(tmp_path / "all.h5ad"), "--out", str(tmp_path / "memory"),
                     *args]) == 2  # no such file yet
    adata.write_h5ad(tmp_path / "all.h5ad")
    assert cli.main(["fit", str(tmp_path / "all.h5ad"), "--out", str(tmp_path / "memory"),
                     *args]) == 0
    disk, memory = ad.read_h5ad(out / "result.h5ad"), ad.read_h5ad(tmp_path / "memory" /
                                                                   "result.h5ad")
    assert disk.X is None and list(disk.var_names) == list(adata.var_names)
    pd.testing.assert_frame_equal(disk.obs, adata.obs)
    np.testing.assert_allclose(disk.obsm["X_rep"], memory.obsm["X_rep"], atol=1e-5)


@pytest.mark.usefixtures("small_arch")
def test_fit_backed_streams_the_result_and_copies_the_counts(small_h5ad, tmp_path: Path,
                                                             monkeypatch, capsys) -> None:
    import scipy.sparse as sp

    from step.workflows import scModel

    path, adata = small_h5ad
    monkeypatch.setattr(cli, "UMAP_MAX_CELLS", 100)
    out = tmp_path / "out"
    code = cli.main(["fit", str(path), "--out", str(out), "--backed", "--copy-counts",
                     "--epochs", "2", "--quiet"])
    assert code == 0
    result = _check_outputs(out, adata, obsm={"X_rep"})
    assert sp.issparse(result.X) and (result.X != sp.csr_matrix(adata.X)).nnz == 0
    assert "UMAP of 100 of the 240 cells" in capsys.readouterr().err
    # the streamed embedding is the saved model's in-memory embedding of the same cells
    loaded = scModel.load(out / "run", adata.copy())
    np.testing.assert_allclose(result.obsm["X_rep"], loaded.embed(), rtol=1e-5, atol=1e-6)
    assert not list(out.glob(".*.tmp"))
    assert cli.main(["fit", str(path), "--out", str(tmp_path / "o2"), "--copy-counts"]) == 2


@pytest.mark.usefixtures("small_arch")
def test_fit_spatial(spatial_counts: ad.AnnData, tmp_path: Path) -> None:
    adata = spatial_counts[spatial_counts.obs["section"].isin(["section_0", "section_1"])
                           ].copy()
    path = tmp_path / "spatial.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out"
    code = cli.main(["fit", str(path), "--out", str(out), "--spatial", "--section-key",
                     "section", "--n-clusters", "4", "--epochs", "2", "--graph-epochs", "2",
                     "--quiet"])
    assert code == 0
    result = _check_outputs(out, adata, obsm={"X_rep", "X_smoothed"}, obs={"domain"})
    assert result.obs["domain"].nunique() == 4
    assert _png(out / "figures" / "spatial_domains.png")


def test_fit_reports_usage_errors(small_h5ad, tmp_path: Path, capsys) -> None:
    path, _ = small_h5ad
    assert cli.main(["fit", str(path), "--out", str(tmp_path), "--spatial"]) == 2
    assert "--n-clusters" in capsys.readouterr().err
    assert cli.main(["fit", str(tmp_path / "none.h5ad"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["fit", str(path), "--out", str(tmp_path), "--refine-epochs", "2"]) == 2


def test_demo_in_a_subprocess(tmp_path: Path, pbmc_counts: ad.AnnData) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "step.cli", "demo", "--out", str(out),
                           "--epochs", "2", "--quiet"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = _check_outputs(out, pbmc_counts, obsm={"X_rep"})
    assert "bulk_labels" in result.obs


@pytest.mark.usefixtures("small_arch")
def test_demo_trains_in_full_precision_on_every_machine(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from step.workflows import scModel

    chosen = []
    original = scModel.run

    def run(self, *args, **kw):
        out = original(self, *args, **kw)
        chosen.append(self.trainer.precision)
        return out

    monkeypatch.setattr(scModel, "run", run)
    # as on a CPU with native bf16, where "auto" would pick bf16
    monkeypatch.setattr("step.functionality.comps.trainer._device.native_bf16",
                        lambda device: True)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"]) == 0
    assert chosen == ["fp32"]


def test_interrupt_saves_a_checkpoint_and_exits_130(small_h5ad, tmp_path: Path) -> None:
    path, _ = small_h5ad
    out = tmp_path / "out"
    checkpoint = out / "run" / "checkpoints" / "checkpoint.pt"
    err = _interrupt_when_checkpointed(["fit", str(path), "--out", str(out), "--epochs",
                                        "100000", "--batch-size", "16", "--quiet"], checkpoint)
    assert not (out / "result.h5ad").exists()
    state = torch.load(checkpoint, weights_only=True)
    done = int(state["counters"]["loop_epoch"])
    assert f"after {done} completed epoch" in err
    expected = (f"continue with: step fit {path} --out {out} --epochs 100000 --batch-size 16 "
                f"--quiet --resume {checkpoint}")
    assert expected in err, err

    # the checkpoint continues the interrupted run for two more epochs
    code = cli.main(["fit", str(path), "--out", str(out), "--batch-size", "16", "--resume",
                     str(checkpoint), "--epochs", str(done + 2), "--quiet"])
    assert code == 0
    history = pd.read_csv(out / "run" / "history.csv")
    assert history["epoch"].tolist() == list(range(done + 2))


def _interrupt_when_checkpointed(argv: list[str], checkpoint: Path) -> str:
    """Run ``python -m step.cli argv``, send SIGINT once ``checkpoint`` exists; stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "step.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a suite started in the background of a non-interactive shell
                            # inherits SIGINT as ignored; the child must see Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert checkpoint.exists(), "no periodic checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


def test_demo_interrupted_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    checkpoint = out / "run" / "checkpoints" / "checkpoint.pt"
    err = _interrupt_when_checkpointed(["demo", "--out", str(out), "--epochs", "100000",
                                        "--quiet"], checkpoint)
    line = next(x for x in err.splitlines() if x.startswith("continue with: "))
    assert line == (f"continue with: step demo --out {out} --epochs 100000 --quiet "
                    f"--resume {checkpoint}")
    done = int(torch.load(checkpoint, weights_only=True)["counters"]["epoch"])
    assert f"after {done} completed epochs" in err
    argv = line.removeprefix("continue with: step ").split()
    argv[argv.index("--epochs") + 1] = str(done + 1)
    assert cli.main(argv) == 0
    history = pd.read_csv(out / "run" / "history.csv")
    assert history["epoch"].tolist() == list(range(done + 1))


def test_resuming_a_finished_fit_changes_nothing(small_h5ad, small_arch, tmp_path: Path,
                                                 capsys) -> None:
    path, _ = small_h5ad
    out = tmp_path / "out"
    assert cli.main(["fit", str(path), "--out", str(out), "--epochs", "2"]) == 0
    checkpoint = out / "run" / "checkpoints" / "checkpoint.pt"
    before = ad.read_h5ad(out / "result.h5ad").obsm["X_rep"]
    history = pd.read_csv(out / "run" / "history.csv")
    capsys.readouterr()
    assert cli.main(["fit", str(path), "--out", str(out), "--epochs", "2", "--resume",
                     str(checkpoint)]) == 0
    said = capsys.readouterr()
    assert "had already finished" in said.out + said.err
    after = pd.read_csv(out / "run" / "history.csv")
    pd.testing.assert_frame_equal(after.drop(columns="seconds"),
                                  history.drop(columns="seconds"))
    np.testing.assert_array_equal(ad.read_h5ad(out / "result.h5ad").obsm["X_rep"], before)


class _InterruptAtStep:
    """Raises KeyboardInterrupt (as Ctrl-C would) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.usefixtures("small_arch")
def test_steps_per_epoch_run_interrupted_mid_epoch_resumes_to_the_same_result(
        small_h5ad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from step.workflows import scModel

    path, _ = small_h5ad

    def argv(out: Path) -> list[str]:
        return ["fit", str(path), "--out", str(out), "--epochs", "6", "--batch-size", "16",
                "--steps-per-epoch", "3", "--block-size", "8", "--seed", "3", "--quiet"]

    assert cli.main(argv(tmp_path / "ref")) == 0
    reference = pd.read_csv(tmp_path / "ref" / "run" / "history.csv")
    # 192 training cells are 12 batches of 16; each epoch stops after 3 of them
    assert reference["epoch"].tolist() == list(range(6))

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        original = scModel.run
        patch.setattr(scModel, "run", lambda self, **kw: original(
            self, callbacks=[_InterruptAtStep(11)], **kw))  # step 2 of epoch 4
        assert cli.main(argv(out)) == 130
    checkpoint = out / "run" / "checkpoints" / "checkpoint.pt"
    counters = torch.load(checkpoint, weights_only=True)["counters"]
    assert counters["epoch"] == 3 and counters["global_step"] == 9
    assert "after 3 completed epochs" in capsys.readouterr().err

    assert cli.main([*argv(out), "--resume", str(checkpoint)]) == 0
    resumed = pd.read_csv(out / "run" / "history.csv")
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"),
                                  reference.drop(columns="seconds"))
    np.testing.assert_array_equal(ad.read_h5ad(out / "result.h5ad").obsm["X_rep"],
                                  ad.read_h5ad(tmp_path / "ref" / "result.h5ad").obsm["X_rep"])


class _TruncateAtStep:
    """Truncates ``path`` after optimizer step ``step``, as a damaged disk might."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, step: int) -> None:
        if step == self.step:
            os.truncate(self.path, 4096)


@pytest.mark.usefixtures("small_arch")
def test_fit_names_a_file_truncated_while_training_and_resumes_once_restored(
        small_h5ad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from step.workflows import scModel

    path, _ = small_h5ad
    copy = tmp_path / "copy.h5ad"
    copy.write_bytes(path.read_bytes())
    out = tmp_path / "out"
    argv = ["fit", str(copy), "--out", str(out), "--backed", "--epochs", "3",
            "--batch-size", "32", "--quiet"]
    with monkeypatch.context() as patch:
        original = scModel.run
        patch.setattr(scModel, "run", lambda self, **kw: original(
            self, callbacks=[_TruncateAtStep(copy, 8)], **kw))  # 6 steps per epoch
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    checkpoint = out / "run" / "checkpoints" / "checkpoint.pt"
    assert f"step: error: {str(copy)!r} was changed" in err
    assert f"the training state after 1 completed epoch was saved to {checkpoint}" in err
    line = next(x for x in err.splitlines() if x.startswith("once the file is restored"))
    assert line.endswith(f"--resume {checkpoint}")
    assert not (out / "result.h5ad").exists()

    copy.write_bytes(path.read_bytes())
    assert cli.main([*argv, "--resume", str(checkpoint)]) == 0
    assert pd.read_csv(out / "run" / "history.csv")["epoch"].tolist() == [0, 1, 2]
