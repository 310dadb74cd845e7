"""The tutorials run end to end in quick mode and read like notebooks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
EXPECTED = (
    "01_single_cell_embedding.py",
    "02_integration_and_refinement.py",
    "03_spatial_domains.py",
    "04_resume_a_run.py",
)
SCRIPTS = sorted(p for p in TUTORIALS.glob("[0-9][0-9]_*.py"))


def _run(script: Path, out: Path, *, env_quick: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    args = [sys.executable, str(script), "--out", str(out)]
    if env_quick:
        env["STEP_TUTORIAL_QUICK"] = "1"
    else:
        args.append("--quick")
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    proc.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    assert proc.returncode == 0, (
        f"{script.name} failed ({proc.returncode}).\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return proc


def test_every_tutorial_is_present():
    present = {p.name for p in SCRIPTS}
    missing = [name for name in EXPECTED if name not in present]
    assert not missing, f"missing tutorials: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_reads_like_a_notebook(script):
    text = script.read_text()
    cells = re.findall(r"^# %%(.*)$", text, flags=re.MULTILINE)
    assert text.startswith("# %% [markdown]\n# # "), "start with a markdown cell and a title"
    assert sum(c.strip() == "[markdown]" for c in cells) >= 3, "explain the steps in markdown"
    assert sum(c.strip() == "" for c in cells) >= 3, "split the code into cells"
    assert "--quick" in text and "STEP_TUTORIAL_QUICK" in text and "--out" in text
    for banned in ("/tmp/", "/work/"):
        assert banned not in text, f"tutorials must not use machine-specific paths ({banned})"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_runs_in_quick_mode(script, tmp_path):
    out = tmp_path / "out"
    # one tutorial takes quick mode from the environment, the others from the flag
    proc = _run(script, out, env_quick=script.stem.startswith("04"))
    assert out.is_dir() and any(out.iterdir()), "a tutorial writes its results into --out"
    CHECKS.get(script.stem, lambda out, proc: None)(out, proc)


def _check_resume(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert "histories and weights are identical" in proc.stdout
    assert "interrupted during epoch" in proc.stdout
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == list(range(len(history)))
    assert {"recon_loss", "val_recon_loss", "lr_all"} <= set(history.columns)
    assert (out / "run.pt").is_file()


def _check_embedding(out: Path, proc: subprocess.CompletedProcess) -> None:
    import anndata as ad

    adata = ad.read_h5ad(out / "pbmc_embedded.h5ad")
    assert adata.obsm["X_rep"].shape[0] == adata.n_obs == 700
    assert "leiden" in adata.obs
    assert {p.name for p in (out / "model").iterdir()} >= {"model.pt", "config.json",
                                                             "history.csv"}
    assert (out / "history.png").is_file() and (out / "embedding.png").is_file()
    assert "the loaded model reproduces the embedding: True" in proc.stdout


def _check_integration(out: Path, proc: subprocess.CompletedProcess) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 and summary["cell-type ARI"].notna().all()
    history = pd.read_csv(out / "history.csv")
    stage2 = history[history["stage"] == 2]
    assert len(stage2) and "cl_loss" in stage2.columns
    assert (stage2["lr_backbone"] < stage2["lr_head"]).all()
    assert (out / "batches.png").is_file()


def _check_spatial(out: Path, proc: subprocess.CompletedProcess) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and summary["domain ARI"].between(-1, 1).all()
    history = pd.read_csv(out / "history_end_to_end.csv")
    assert {"recon_loss", "raw_recon_loss", "contrast_loss", "val_recon_loss"} <= set(
        history.columns)
    for name in ("domains_true", "domains_two_stage", "domains_end_to_end"):
        assert (out / f"{name}.png").is_file(), name


CHECKS = {
    "01_single_cell_embedding": _check_embedding,
    "02_integration_and_refinement": _check_integration,
    "03_spatial_domains": _check_spatial,
    "04_resume_a_run": _check_resume,
}
