"""Sphinx configuration for the step documentation."""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import step  # noqa: E402

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
]

# Offline build: no intersphinx. References to our own objects must resolve; references
# to other projects' types are listed below as known to be external.
nitpicky = True
_EXTERNAL = (
    "torch", "torch_geometric", "numpy", "np", "pandas", "anndata", "scipy", "scanpy",
    "collections", "os", "pathlib",
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

templates_path: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"step {release}"
html_theme_options = {
    "description": "TranscriptFormer training for single-cell and spatial transcriptomics",
    "fixed_sidebar": True,
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


def _resolve_reexport(app, env, node, contnode):
    """Resolve ``step.pkg.name`` to the documented ``step.pkg.module.name``.

    Public names are re-exported by their packages (``step.utils.prepare_counts``) but
    documented where they are defined (``step.utils.preprocess.prepare_counts``);
    docstrings may use either path.
    """
    if node.get("refdomain") != "py":
        return None
    module, _, name = node.get("reftarget", "").rpartition(".")
    if not module.startswith("step"):
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    home = getattr(obj, "__module__", None)
    if not home or home == module:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"{home}.{name}", node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-process-docstring", _keep_property_text, priority=100)
    app.connect("autodoc-process-docstring", _restore_property_text, priority=900)
