"""scanpy-style signatures for every public workflow entry point.

Functions and methods that take an AnnData take it first (``load``, which rebuilds a
saved model, takes the saved folder first and the AnnData second), accept at most three
positional parameters, and take everything else, ``key_added`` included, by keyword only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import pytest

import step.workflows
import step.workflows.figures

MAX_POSITIONAL = 3
#: Methods whose first argument is a saved model folder, followed by the AnnData.
PATH_FIRST = {"load"}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _public_callables() -> Iterator[tuple[str, Callable]]:
    for name in step.workflows.__all__:
        obj = getattr(step.workflows, name)
        if inspect.isclass(obj):
            yield f"{name}.__init__", obj.__init__
            for attr, member in inspect.getmembers(obj):
                if attr.startswith("_") or not callable(member):
                    continue
                yield f"{name}.{attr}", member
        elif callable(obj):
            yield name, obj
    for name in step.workflows.figures.__all__:
        yield f"figures.{name}", getattr(step.workflows.figures, name)


def _params(fn: Callable) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return params


CALLABLES = dict(_public_callables())


def test_the_public_surface_is_found() -> None:
    assert {"scModel.__init__", "scModel.run", "scModel.refine", "scModel.embed",
            "scModel.save", "scModel.load", "stModel.__init__", "stModel.run",
            "stModel.cluster", "stModel.embed", "stModel.load",
            "figures.plot_umap"} <= set(CALLABLES)


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_at_most_three_positional_parameters(name: str) -> None:
    positional = [p.name for p in _params(CALLABLES[name]) if p.kind in _POSITIONAL]
    assert len(positional) <= MAX_POSITIONAL, f"{name} has positional {positional}"


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_adata_comes_first(name: str) -> None:
    names = [p.name for p in _params(CALLABLES[name])]
    if "adata" not in names:
        return
    expected = 1 if name.rsplit(".", 1)[-1] in PATH_FIRST else 0
    assert names.index("adata") == expected, f"{name}: parameters {names}"
    assert _params(CALLABLES[name])[expected].kind in _POSITIONAL


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_options_are_keyword_only(name: str) -> None:
    params = _params(CALLABLES[name])
    for p in params:
        if p.name in ("key_added", "smoothed_key", "use_rep", "layer", "batch_key",
                      "class_key", "section_key", "spatial_key", "seed", "device"):
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {p.name} is positional"
    positional = [p for p in params if p.kind in _POSITIONAL]
    has_adata = any(p.name == "adata" for p in params)
    if name.endswith(".__init__") and has_adata:
        assert [p.name for p in positional] == ["adata"], f"{name}: {positional}"


@pytest.mark.parametrize("name", ["scModel.run", "scModel.refine", "stModel.run",
                                  "stModel.cluster"])
def test_result_writers_take_key_added(name: str) -> None:
    params = {p.name: p for p in _params(CALLABLES[name])}
    assert "key_added" in params, name
    assert params["key_added"].kind is inspect.Parameter.KEYWORD_ONLY
    assert isinstance(params["key_added"].default, str)


def test_default_result_keys_are_the_documented_ones() -> None:
    from step._constants import ADATA_KEYS

    def default(name: str, param: str) -> object:
        return inspect.signature(CALLABLES[name]).parameters[param].default

    assert default("scModel.run", "key_added") == ADATA_KEYS.X_REP
    assert default("scModel.refine", "key_added") == ADATA_KEYS.X_ANCHORED
    assert default("stModel.run", "key_added") == ADATA_KEYS.X_REP
    assert default("stModel.run", "smoothed_key") == ADATA_KEYS.X_SMOOTHED
    assert default("stModel.cluster", "key_added") == ADATA_KEYS.DOMAIN
    assert default("stModel.cluster", "use_rep") == ADATA_KEYS.X_SMOOTHED
