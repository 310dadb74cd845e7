"""Sphinx helpers for the step documentation.

* ``api-summary`` and ``api-members`` build the API reference from a module's
  ``__all__``, so a name added there is documented without editing the pages;
* :func:`read_tutorial` turns a tutorial script into the notebook that myst-nb
  executes;
* :func:`copy_tutorials` brings the tutorial scripts into the documentation source;
* :func:`resolve_public_name` lets references use either the public path of an object
  (``step.utils.ScDataset``) or the module that defines it
  (``step.utils.dataset.ScDataset``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import shutil
from pathlib import Path

import jupytext
import nbformat
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
#: the modules whose ``__all__`` make up the public API
PUBLIC_MODULES = (
    "step.functionality.comps.trainer",
    "step.models",
    "step.utils",
    "step.graph",
    "step.datasets",
    "step.workflows",
)


# --------------------------------------------------------------------------- API pages
def _public_names(module_name: str) -> list[str]:
    return list(importlib.import_module(module_name).__all__)


def _documented_by_hand(source: str) -> set[str]:
    """Names that a page documents itself (the last component of each target)."""
    names = set()
    for match in re.finditer(r"^\s*\.\. (?:auto)?(?:class|function|exception|data|"
                             r"attribute|method|decorator)::\s+([\w.]+)", source, flags=re.M):
        names.add(match[1].rsplit(".", 1)[-1])
    for match in re.finditer(r"^\.\. automodule::[^\n]*\n((?:[ \t]+:[^\n]*\n)*)", source,
                             flags=re.M):
        members = re.search(r":members:[ \t]*(.*)", match[1])
        if members:
            names.update(n.strip() for n in members[1].split(",") if n.strip())
    return names


def _directive_for(obj) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


class _ApiDirective(SphinxDirective):
    required_arguments = 1
    has_content = False

    def _parse(self, lines: list[str], container: nodes.Element | None = None
               ) -> list[nodes.Node]:
        holder = nodes.section() if container is None else container
        content = StringList(lines, source=self.get_source_info()[0])
        nested_parse_with_titles(self.state, content, holder)
        return [container] if container is not None else holder.children

    def _register(self, module_name: str) -> None:
        module = importlib.import_module(module_name)
        self.env.note_dependency(inspect.getfile(module))


class ApiSummary(_ApiDirective):
    """A table of every name in the module's ``__all__``, linked to its entry."""

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        self._register(module_name)
        module = importlib.import_module(module_name)
        names = _public_names(module_name)
        # constants have no docstring of their own: listed by name, not in the table
        data = [n for n in names if _directive_for(getattr(module, n)) == "autodata"]
        # autosummary wants names relative to the current module, when it is this one
        here = self.env.ref_context.get("py:module") == module_name
        prefix = "" if here else f"~{module_name}."
        lines = [".. autosummary::", ""]
        lines += [f"   {prefix}{name}" for name in names if name not in data]
        if data:
            refs = ", ".join(f":data:`{prefix}{name}`" for name in data)
            lines += ["", f"Constants: {refs}."]
        return self._parse(lines, nodes.container(classes=["api-summary"]))


class ApiMembers(_ApiDirective):
    """Entries for the names of ``__all__`` that the page does not document itself.

    A page documents an object by hand when it needs more than the defaults (selected
    members, signatures, extra attributes); every other public name is documented here
    with autodoc's defaults, under the public module path.
    """

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        self._register(module_name)
        module = importlib.import_module(module_name)
        source = Path(self.env.doc2path(self.env.docname)).read_text()
        by_hand = _documented_by_hand(source)
        lines: list[str] = []
        for name in _public_names(module_name):
            if name in by_hand:
                continue
            directive = _directive_for(getattr(module, name))
            lines += [f".. {directive}:: {module_name}.{name}"]
            if directive == "autodata":
                lines += ["   :no-value:"]
            lines += [""]
        return self._parse(lines) if lines else []


def resolve_public_name(app, env, node, contnode):
    """Resolve a reference to a ``step`` object documented under another path.

    Public names are defined in private or public submodules and re-exported by their
    packages; a page documents each once, and docstrings may use either path.
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
    candidates = [getattr(obj, "__module__", None)]
    candidates += [m for m in PUBLIC_MODULES
                   if getattr(importlib.import_module(m), name, None) is obj]
    domain = env.get_domain("py")
    for home in dict.fromkeys(c for c in candidates if c and c != module):
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                    f"{home}.{name}", node, contnode)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- tutorials
def source_digest() -> str:
    """A digest of the package's code: the tutorials run again when the code changes."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "step").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_SETUP = """\
# Set by the documentation build; not part of the tutorial.
# step sources: {digest}
import os
import sys
import warnings

%matplotlib inline
# tqdm.auto, imported by a dependency, asks for ipywidgets in a notebook
warnings.filterwarnings("ignore", message="IProgress not found")
os.environ["STEP_TUTORIAL_QUICK"] = "1"
if os.environ.get("STEP_DOCS_TUTORIAL_OUT"):
    sys.argv += ["--out", os.path.join(os.environ["STEP_DOCS_TUTORIAL_OUT"], "{folder}")]
"""


_NOTE = """\
```{note}
This page was executed while the documentation was built, in quick mode: a short
training run on a small model. Its numbers and figures show what the code does, not how
well a fully trained model performs; run the script without `--quick` for that. The
download button above gives you the script.
```
"""


def read_tutorial(text: str) -> nbformat.NotebookNode:
    """Read a tutorial script (jupytext percent format) as a notebook for the docs.

    A hidden first code cell runs the tutorial in quick mode with figures shown inline,
    writes its files into ``$STEP_DOCS_TUTORIAL_OUT/<default output folder>`` when that
    is set (``.../tutorial-01`` for the first tutorial), and
    records a digest of the package's code, so the execution cache is used only while
    neither the tutorial nor the code has changed.
    """
    notebook = jupytext.reads(text, fmt="py:percent")
    folder = _default_out(text)
    cell = nbformat.v4.new_code_cell(_SETUP.format(digest=source_digest(), folder=folder))
    cell.metadata["tags"] = ["remove-cell"]
    position = next((i for i, c in enumerate(notebook.cells) if c.cell_type == "code"), 0)
    notebook.cells.insert(position, cell)
    notebook.cells.insert(1, nbformat.v4.new_markdown_cell(_NOTE))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    return notebook


def _default_out(text: str) -> str:
    """The tutorial's default output folder (``tutorial-01``)."""
    match = re.search(r'"--out", default="([\w.-]+)"', text)
    if not match:
        raise ValueError("a tutorial takes --out with a default folder")
    return match[1]


def copy_tutorials(srcdir: Path) -> list[str]:
    """Copy the tutorial scripts into ``<srcdir>/tutorials``; return the page names.

    A file is rewritten only when it changed, so Sphinx rebuilds only those pages.
    """
    target = srcdir / "tutorials"
    target.mkdir(exist_ok=True)
    pages = []
    scripts = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    for script in scripts:
        copy = target / script.name
        if not copy.is_file() or copy.read_bytes() != script.read_bytes():
            shutil.copyfile(script, copy)
        pages.append(f"tutorials/{script.stem}")
    for stale in set(target.glob("*.py")) - {target / s.name for s in scripts}:
        stale.unlink()
    return pages


def setup(app):
    app.add_directive("api-summary", ApiSummary)
    app.add_directive("api-members", ApiMembers)
    app.connect("missing-reference", resolve_public_name)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
