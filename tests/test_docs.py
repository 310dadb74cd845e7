"""The documentation builds without warnings and agrees with the code it describes."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: what the build needs besides Sphinx: executing and rendering the tutorials, the theme
DOCS_PACKAGES = ("sphinx", "myst_nb", "jupytext", "ipykernel", "sphinx_book_theme")
TUTORIAL_PAGES = sorted(f"tutorials/{p.stem}" for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py"))

def _public_module_names() -> tuple[str, ...]:
    """The public modules as the documentation's own extension lists them."""
    spec = importlib.util.spec_from_file_location("step_docs", DOCS / "_ext" / "step_docs.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext.PUBLIC_MODULES


def build_docs(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML documentation once per test session; any warning fails the build.

    The build executes every tutorial in quick mode (``-D nb_execution_mode=force``: the
    execution cache is not used, so the code under test runs); the files the tutorials
    write are kept in ``<build>/tutorial-outputs/<default output folder>`` and the
    executed notebooks in ``<build>/jupyter_execute/tutorials``. ``tests/test_tutorials.py``
    checks both, so the tutorials run once for both test files.
    """
    for name in DOCS_PACKAGES:
        pytest.importorskip(name)
    built = getattr(config, "_step_docs_html", None)
    if isinstance(built, str):
        pytest.fail(built)  # the build failed earlier in this session; not run again
    if built is not None:
        return built
    root = tmp_path_factory.mktemp("docs")
    out = root / "html"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "STEP_DOCS_TUTORIAL_OUT": str(root / "tutorial-outputs"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-D", "nb_execution_mode=force", str(DOCS), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        config._step_docs_html = f"sphinx-build failed:\n{proc.stderr[-8000:]}"  # type: ignore[attr-defined]
        pytest.fail(config._step_docs_html)  # type: ignore[attr-defined]
    (root / "build-seconds.txt").write_text(f"{seconds:.1f}\n")
    config._step_docs_html = out  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def html(request, tmp_path_factory) -> Path:
    return build_docs(request.config, tmp_path_factory)


def _documented(html: Path) -> set[str]:
    """Full names of every object in the built inventory."""
    raw = (html / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]
    names = set()
    for line in zlib.decompress(body).decode().splitlines():
        match = re.match(r"(\S+)\s+py:\w+\s", line)
        if match:
            names.add(match.group(1))
    return names


def test_docs_build_without_warnings(html):
    for page in ("index", "installation", "quickstart", "tutorials", "guide/trainer",
                 "guide/spatial", "guide/data", "api/index", "api/trainer", "differences",
                 "benchmarks", "troubleshooting", "changelog", "workflows/index",
                 "workflows/single_cell", "workflows/integration", "workflows/spatial",
                 "search", *TUTORIAL_PAGES):
        assert (html / f"{page}.html").is_file(), page
    assert len(TUTORIAL_PAGES) >= 4


def test_pages_show_the_package_version(html):
    import step

    for page in ("index", "tutorials", "api/trainer"):
        assert f"step {step.__version__}" in (html / f"{page}.html").read_text(), page


def _images(page: Path) -> list[str]:
    """Sources of the images on a page whose data is embedded or copied into the build."""
    found = []
    for src in re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", page.read_text()):
        if src.startswith("data:image/") or (src.endswith((".png", ".svg", ".jpg"))
                                             and (page.parent / src).is_file()):
            found.append(src)
    return found


@pytest.mark.parametrize("page", TUTORIAL_PAGES)
def test_tutorial_pages_show_executed_output_and_figures(html, page):
    path = html / f"{page}.html"
    text = path.read_text()
    assert _images(path), f"{page} shows no figure"
    outputs = re.findall(r'<div class="cell_output docutils container">(.*?)</div>\s*</div>',
                         text, flags=re.S)
    assert len(outputs) >= 3, f"{page} shows no executed output"
    assert "Traceback" not in text and "output error" not in text
    assert "step sources:" not in text, "the build's own setup cell is hidden"


def test_tutorial_pages_offer_their_script(html):
    for page in TUTORIAL_PAGES:
        text = (html / f"{page}.html").read_text()
        source = f"_sources/{page}.py"
        assert f'href="../{source}"' in text, page
        assert (html / source).read_text() == (ROOT / f"{page}.py").read_text(), page


def test_workflow_pages_link_their_tutorials(html):
    for page, tutorial in (("single_cell", "01_single_cell_embedding"),
                           ("integration", "02_integration_and_refinement"),
                           ("spatial", "03_spatial_domains")):
        text = (html / "workflows" / f"{page}.html").read_text()
        assert f'href="../tutorials/{tutorial}.html' in text, page
        assert _images(html / "tutorials" / f"{tutorial}.html"), tutorial


def test_api_pages_summarise_every_public_name(html):
    pages = {"step.functionality.comps.trainer": "trainer", "step.models": "models",
             "step.utils": "utils", "step.graph": "graph", "step.datasets": "datasets",
             "step.workflows": "workflows"}
    for module in _public_modules():
        text = (html / "api" / f"{pages[module.__name__]}.html").read_text()
        summary = re.search(r'<div class="api-summary docutils container">.*?</table>'
                            r'(?:\s*</div>)?(?:\s*<p>.*?</p>)?', text, flags=re.S)
        assert summary, module.__name__
        for name in module.__all__:
            assert f">{name}<" in summary[0], f"{module.__name__}.{name}"


def _public_modules():
    for name in _public_module_names():
        if not (ROOT / Path(*name.split("."))).is_dir():
            continue  # not part of this checkout (yet)
        yield importlib.import_module(name)


def test_every_public_name_is_documented(html):
    documented = _documented(html)
    missing = []
    for module in _public_modules():
        for name in module.__all__:
            obj = getattr(module, name)
            homes = {module.__name__, getattr(obj, "__module__", None)}
            if not any(f"{home}.{name}" in documented for home in homes if home):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public names without API documentation: {missing}"


def test_trainer_loops_are_shown_with_their_call_signatures(html):
    text = (html / "api" / "trainer.html").read_text()
    plain = re.sub(r"<[^>]+>", "", text)
    for call in ("train(epochs, X,", "train_batch(epochs, loaders,",
                 "train_graph_batch(epochs, gloader, dataset,",
                 "train_node_sampler(epochs, gloader, dataset,"):
        assert call in plain, call
    assert "(state," not in plain, "the epoch-state argument is internal to the loops"


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [c for c in re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
            if "python3 -m venv" in c]


def test_installation_page_shows_the_readme_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    page = (DOCS / "installation.rst").read_text()
    for command in commands:
        assert f"   {command}\n" in page, command


def test_differences_page_names_tests_that_exist():
    text = (DOCS / "differences.rst").read_text()
    refs = re.findall(r"``(tests/[\w/]+\.py)::(\w+)``", text)
    assert len(refs) >= 10
    sections = re.findall(r"^Guarded by$", text, flags=re.M)
    assert len(sections) >= 10, "every defect names the tests that guard it"
    for path, name in refs:
        source = ROOT / path
        assert source.is_file(), path
        assert re.search(rf"^def {name}\(", source.read_text(), flags=re.M), f"{path}::{name}"


def test_stop_defaults_table_matches_the_code():
    from step.functionality.comps.trainer._early_stopping import (
        OTHER_STOP_DEFAULTS,
        TERM_STOP_DEFAULTS,
    )

    text = (DOCS / "guide" / "trainer.rst").read_text()
    rows = dict(
        (term, (int(p), float(d)))
        for term, p, d in re.findall(
            r"\* - ``(\w+)``(?: \(.*?\))?\s+- (\d+)\s+- ([\d.e-]+)", text)
    )
    for term, default in TERM_STOP_DEFAULTS.items():
        assert rows.get(term) == (default.patience, default.delta), term
    other = re.search(r"\* - any other term.*?\n\s+- (\d+)\s+- ([\d.e-]+)", text)
    assert other and (int(other[1]), float(other[2])) == (
        OTHER_STOP_DEFAULTS.patience, OTHER_STOP_DEFAULTS.delta)


def test_trainer_defaults_quoted_in_the_guide_match_the_code():
    from step.functionality.comps.trainer import Trainer

    text = " ".join((DOCS / "guide" / "trainer.rst").read_text().split())
    params = inspect.signature(Trainer).parameters
    for name in ("max_bad_steps", "max_rollbacks"):
        assert f"``{name}`` ({params[name].default})" in text, name
    for name, value in (("stop_rule", '"all"'), ("on_nonfinite", '"rollback"')):
        assert repr(params[name].default).replace("'", '"') == value, name
    init = inspect.signature(Trainer.init_optimizer).parameters
    assert "``init_optimizer(lr=1e-3)``" in text and init["lr"].default == 1e-3
    assert "``init_optimizer(lr=1e-3, tune_lr=1e-4, stage=2)``" in text
    assert init["tune_lr"].default == 1e-4
    sched = inspect.signature(Trainer.set_lr_scheduler).parameters
    assert sched["kind"].default == "multistep" and sched["gamma"].default == 0.5
    assert "``gamma=0.5``" in text


def test_command_line_page_lists_every_option():
    if not (ROOT / "step" / "cli.py").is_file():
        pytest.skip("no command line in this checkout")
    from step.cli import build_parser

    text = (DOCS / "cli.rst").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        assert f"step {name}" in text, name
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"``{option}" in text, f"step {name} {option}"
