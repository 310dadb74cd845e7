"""The tutorials run end to end in quick mode and read like notebooks.

The documentation build executes every tutorial (``tests/test_docs.py``); the checks
here read what those runs printed and wrote, so each tutorial runs once per test
session. Without the packages the build needs, the tutorials run as scripts instead.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
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


@dataclass
class Run:
    """What one quick run of a tutorial printed and where it wrote its files."""

    out: Path
    stdout: str


@functools.lru_cache(maxsize=1)
def _docs_test_module():
    spec = importlib.util.spec_from_file_location("_step_test_docs", ROOT / "tests" / "test_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _docs_build_available() -> bool:
    return all(importlib.util.find_spec(name) for name in _docs_test_module().DOCS_PACKAGES)


def _default_out(script: Path) -> str:
    match = re.search(r'"--out", default="([\w.-]+)"', script.read_text())
    assert match, "a tutorial takes --out with a default folder"
    return match[1]


def _from_docs_build(script: Path, request, tmp_path_factory) -> Run:
    """The run of ``script`` that the documentation build executed."""
    html = _docs_test_module().build_docs(request.config, tmp_path_factory)
    notebook = json.loads(
        (html.parent / "jupyter_execute" / "tutorials" / f"{script.stem}.ipynb").read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", "".join(output.get("traceback", []))
            if output["output_type"] == "stream" and output["name"] == "stdout":
                texts.append("".join(output["text"]))
    return Run(html.parent / "tutorial-outputs" / _default_out(script), "".join(texts))


def _as_script(script: Path, out: Path, *, env_quick: bool = False) -> Run:
    """Run ``script`` as a plain script in quick mode."""
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
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, (
        f"{script.name} failed ({proc.returncode}) after {seconds:.0f} s.\n--- stdout ---\n"
        f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return Run(out, proc.stdout)


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
def test_tutorial_runs_in_quick_mode(script, request, tmp_path_factory):
    if _docs_build_available():
        # quick mode from the environment (STEP_TUTORIAL_QUICK), output folder from --out
        run = _from_docs_build(script, request, tmp_path_factory)
    else:
        # one tutorial takes quick mode from the environment, the others from the flag
        out = tmp_path_factory.mktemp(script.stem) / "out"
        run = _as_script(script, out, env_quick=script.stem.startswith("04"))
    out = run.out
    assert out.is_dir() and any(out.iterdir()), "a tutorial writes its results into --out"
    CHECKS.get(script.stem, lambda out, run: None)(out, run)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_runs_as_a_notebook(script):
    """What the documentation build relies on: quick mode from the environment, kernel
    arguments tolerated, and figures left to the notebook's inline backend."""
    text = script.read_text()
    assert 'os.environ.get("STEP_TUTORIAL_QUICK") == "1"' in text
    assert "parse_known_args()" in text
    for before in re.findall(r"^(.*)\n[ \t]*matplotlib\.use\(", text, flags=re.M):
        assert 'if "ipykernel" not in sys.modules' in before, "choose Agg for scripts only"


def _check_resume(out: Path, proc: Run) -> None:
    assert "histories and weights are identical" in proc.stdout
    assert "interrupted during epoch" in proc.stdout
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == list(range(len(history)))
    assert {"recon_loss", "val_recon_loss", "lr_all"} <= set(history.columns)
    assert (out / "run.pt").is_file() and (out / "resume.png").is_file()


def _check_embedding(out: Path, proc: Run) -> None:
    import anndata as ad

    adata = ad.read_h5ad(out / "pbmc_embedded.h5ad")
    assert adata.obsm["X_rep"].shape[0] == adata.n_obs == 700
    assert "leiden" in adata.obs
    assert {p.name for p in (out / "model").iterdir()} >= {"model.pt", "config.json",
                                                             "history.csv"}
    assert (out / "history.png").is_file() and (out / "embedding.png").is_file()
    assert "the loaded model reproduces the embedding: True" in proc.stdout


def _check_integration(out: Path, proc: Run) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 and summary["cell-type ARI"].notna().all()
    history = pd.read_csv(out / "history.csv")
    stage2 = history[history["stage"] == 2]
    assert len(stage2) and "cl_loss" in stage2.columns
    assert (stage2["lr_backbone"] < stage2["lr_head"]).all()
    assert (out / "batches.png").is_file()


def _check_spatial(out: Path, proc: Run) -> None:
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
