"""Inputs the workflows used to accept silently: another gene set on resume, non-finite
learning rates and divergence, duplicate gene names, spatial resume across modes, and
output folders mixing runs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from step import cli
from step.functionality.comps.trainer import NonFiniteError, read_checkpoint
from step.workflows import scModel, stModel

SMALL = {"hidden_dim": 16, "n_modules": 8, "module_dim": 8, "n_layers": 1, "latent_dim": 8,
         "dropout": 0.0}


@pytest.fixture
def cells(pbmc_counts: ad.AnnData) -> ad.AnnData:
    return pbmc_counts[:200, :300].copy()


@pytest.fixture
def checkpoint(cells: ad.AnnData, tmp_path: Path) -> Path:
    scModel(cells.copy(), **SMALL).run(epochs=1, checkpoint_dir=tmp_path / "a", verbose=False)
    return tmp_path / "a" / "checkpoint.pt"


def _poison(model: scModel) -> None:
    """Make every loss NaN from the first step on."""
    with torch.no_grad():
        for p in model.model.parameters():
            p.fill_(float("nan"))


# ---------------------------------------------------------------- 1. the gene set
def test_checkpoints_record_genes_and_settings(cells, checkpoint) -> None:
    metadata = read_checkpoint(checkpoint)["metadata"]
    assert metadata["genes"] == [str(g) for g in cells.var_names]
    assert metadata["workflow"] == "scModel" and metadata["layer"] is None


def test_resume_refuses_another_gene_set_of_the_same_size(pbmc_counts, checkpoint) -> None:
    other = pbmc_counts[:200, 300:600].copy()
    with pytest.raises(ValueError, match="in the checkpoint only"):
        scModel(other, **SMALL).run(epochs=2, resume=checkpoint, verbose=False)
    assert "X_rep" not in other.obsm


def test_resume_matches_genes_in_another_order_by_name(cells, checkpoint) -> None:
    same = cells.copy()
    scModel(same, **SMALL).run(epochs=2, resume=checkpoint, verbose=False)
    shuffled = cells[:, np.random.default_rng(0).permutation(cells.n_vars)].copy()
    model = scModel(shuffled, **SMALL)
    model.run(epochs=2, resume=checkpoint, verbose=False)
    assert model.genes == [str(g) for g in cells.var_names]
    np.testing.assert_allclose(shuffled.obsm["X_rep"], same.obsm["X_rep"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ 2. learning rates, divergence
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_bad_learning_rates_are_refused_before_training(cells, lr) -> None:
    model = scModel(cells, **SMALL)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        model.run(epochs=2, lr=lr, verbose=False)
    assert model.trainer is None and "X_rep" not in cells.obsm


def test_divergence_raises_and_writes_nothing(cells) -> None:
    model = scModel(cells, **SMALL)
    _poison(model)
    with pytest.raises(NonFiniteError, match="epoch"):
        model.run(epochs=3, verbose=False, max_bad_steps=2)
    assert "X_rep" not in cells.obsm


def test_a_non_finite_embedding_is_never_written(cells, monkeypatch) -> None:
    model = scModel(cells, **SMALL)
    monkeypatch.setattr(model, "_infer", lambda *a, **k: np.full((cells.n_obs, 8), np.nan))
    with pytest.raises(NonFiniteError, match="nothing was written"):
        model.run(epochs=1, verbose=False)
    assert "X_rep" not in cells.obsm


def test_a_model_with_non_finite_weights_is_never_saved(cells, tmp_path) -> None:
    model = scModel(cells, **SMALL)
    _poison(model)
    with pytest.raises(NonFiniteError, match="not saved"):
        model.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_cli_divergence_exits_1_without_results(cells, tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    original = scModel.run

    def run(self, **kw):
        _poison(self)
        return original(self, **kw, max_bad_steps=2)

    monkeypatch.setattr(scModel, "run", run)
    out = tmp_path / "out"
    assert cli.main(["fit", str(path), "--out", str(out), "--epochs", "3", "--quiet"]) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step: error:")]
    assert len(lines) == 1 and "diverged" in lines[0] and "epoch" in lines[0]
    assert not (out / "result.h5ad").exists() and not (out / "run" / "model.pt").exists()


def test_cli_refuses_lr_inf_before_reading_the_input(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "o"), "--lr", "inf"])
    assert stop.value.code == 2
    assert "step: error: argument --lr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ 3. duplicate gene names
@pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning")
def test_duplicate_gene_names_are_refused_everywhere(cells, tmp_path, capsys) -> None:
    model = scModel(cells.copy(), **SMALL)
    dup = cells.copy()
    dup.var_names = [dup.var_names[0], *dup.var_names[:-1]]
    for call in (lambda: scModel(dup, **SMALL), lambda: model.embed(dup)):
        with pytest.raises(ValueError, match="var_names_make_unique"):
            call()
    model.save(tmp_path / "saved")
    with pytest.raises(ValueError, match="var_names_make_unique"):
        scModel.load(tmp_path / "saved", dup)
    dup.write_h5ad(tmp_path / "dup.h5ad")
    assert cli.main(["fit", str(tmp_path / "dup.h5ad"), "--out", str(tmp_path / "o")]) == 2
    assert "var_names_make_unique" in capsys.readouterr().err


# --------------------------------------------------------------- 4. spatial resume
@pytest.fixture
def spots(spatial_counts: ad.AnnData) -> ad.AnnData:
    section = spatial_counts[spatial_counts.obs["section"] == "section_0"]
    return section[:300, :200].copy()


def test_spatial_resume_across_modes_is_refused(spots, tmp_path) -> None:
    stModel(spots.copy(), section_key="section", **SMALL).run(
        epochs=1, graph_epochs=1, checkpoint_dir=tmp_path, verbose=False)
    checkpoint = tmp_path / "checkpoint.pt"
    assert read_checkpoint(checkpoint)["metadata"]["mode"] == "two-stage"
    model = stModel(spots, section_key="section", **SMALL)
    with pytest.raises(ValueError, match="cannot be resumed with mode='end-to-end'"):
        model.run(mode="end-to-end", epochs=1, resume=checkpoint, verbose=False)
    assert model.model.smoother is None and "X_smoothed" not in spots.obsm


def test_spatial_resume_reads_checkpoints_through_the_checked_reader(spots, tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        stModel(spots, section_key="section", **SMALL).run(epochs=1, resume=bad,
                                                           verbose=False)


# ------------------------------------------------------------- 5. output folders
def test_overwrite_clears_the_previous_run(cells, tmp_path, capsys) -> None:
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    out = tmp_path / "out"
    stale = out / "figures" / "spatial_domains.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    argv = ["fit", str(path), "--out", str(out), "--epochs", "1", "--quiet"]
    assert cli.main(argv) == 2
    assert "holds a previous run" in capsys.readouterr().err and stale.read_bytes() == b"old"
    torch.set_num_threads(1)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not stale.exists()
    assert (out / "result.h5ad").is_file() and (out / "figures" / "umap.png").is_file()


def test_overwrite_keeps_files_step_did_not_write(cells, tmp_path, capsys) -> None:
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "run" / "model.pt").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["fit", str(path), "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "run" / "model.pt").read_bytes() == b"old"


def test_resume_command_repeats_the_arguments() -> None:
    argv = ["fit", "my data.h5ad", "--out", "o", "--resume", "old.pt", "--overwrite",
            "--epochs", "5"]
    assert cli.resume_command(argv, Path("o/run/checkpoints/checkpoint.pt")) == (
        "step fit 'my data.h5ad' --out o --epochs 5 --resume o/run/checkpoints/checkpoint.pt")


def test_a_saved_model_still_embeds_a_single_cell(cells, tmp_path) -> None:
    scModel(cells.copy(), **SMALL).save(tmp_path / "saved")
    one = cells[:1].copy()
    assert scModel.load(tmp_path / "saved", one).embed().shape == (1, 8)
