"""Sphinx configuration for the step documentation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))

import step  # noqa: E402
from step_docs import copy_tutorials  # noqa: E402

project = "step"
author = "the step developers"
copyright = "the step developers"  # noqa: A001
version = step.__version__
release = step.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
    "step_docs",
]

# Offline build: no intersphinx. References to our own objects must resolve; references
# to other projects' types are listed below as known to be external.
nitpicky = True
_EXTERNAL = (
    "torch", "torch_geometric", "numpy", "np", "pandas", "anndata", "scipy", "scanpy",
    "collections", "os", "pathlib", "h5py",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})\..+"),
    (r"py:class", r"DataLoader"),  # an annotation imported only for type checking
]
# internal classes that appear in signatures but are not part of the public API
nitpick_ignore = [
    ("py:class", "step.functionality.comps.trainer._running.RunningMeans"),
    ("py:class", "step.graph.sampling._EpochSampler"),
    ("py:class", "step.workflows._base.Workflow"),
    ("py:class", "step.models._blocks.GCNSmoother"),
    ("py:class", "step.functionality.comps.trainer._loops.LoopMethods"),
    ("py:class", "step.functionality.comps.trainer._checkpointing.CheckpointMethods"),
    ("py:class", "contextlib.AbstractContextManager"),
]

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": False,
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_preprocess_types = False

# ---------------------------------------------------------------- executed tutorials
# The tutorial scripts (jupytext percent format) are copied into tutorials/ here and
# rendered as notebooks, executed in quick mode during the build. Results are cached in
# .jupyter_cache/ and reused only while neither the tutorial nor the package's code has
# changed (see step_docs.read_tutorial). ``-D nb_execution_mode=force`` runs them anew.
copy_tutorials(HERE)
source_suffix = {".rst": "restructuredtext", ".py": "myst-nb"}
nb_custom_formats = {".py": "step_docs.read_tutorial"}
nb_execution_mode = "cache"
nb_execution_cache_path = str(HERE / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_in_temp = True
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# the kernel imports this checkout's step, uses one thread per process like the
# benchmarks, and shows figures inline
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.pop("MPLBACKEND", None)

templates_path: list[str] = []
exclude_patterns = ["_build", ".jupyter_cache", "_ext", "conf.py", "**/.ipynb_checkpoints"]

# ---------------------------------------------------------------- theme
html_theme = "sphinx_book_theme"
html_static_path: list[str] = []
html_title = f"step {release}"
html_show_sourcelink = True
html_copy_source = True
html_theme_options = {
    # no public repository: the download button serves each page's source (the
    # tutorial script for a tutorial) and a print view, and works offline
    "use_download_button": True,
    "use_fullscreen_button": True,
    "use_repository_button": False,
    "use_source_button": False,
    "use_edit_page_button": False,
    "use_issues_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    "extra_footer": f"<p>step {release}: TranscriptFormer training for single-cell "
                    "and spatial transcriptomics.</p>",
}


def _keep_property_text(app, what, name, obj, options, lines):
    """Keep property docstrings as written.

    napoleon reads the first line of a property docstring as ``type: description`` when
    it contains a colon, which mangles sentences such as "Current mode: ...". Our
    properties carry their type in the annotation, so their text is kept verbatim.
    """
    if what == "property":
        _saved[name] = list(lines)


def _restore_property_text(app, what, name, obj, options, lines):
    if what == "property" and name in _saved:
        lines[:] = _saved.pop(name)


_saved: dict[str, list[str]] = {}


def setup(app):
    app.connect("autodoc-process-docstring", _keep_property_text, priority=100)
    app.connect("autodoc-process-docstring", _restore_property_text, priority=900)
