"""The code's layering: dependencies point down, with no cycles (imports inside functions included)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stream_app", "models", "producers")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a `from a import b` of a submodule counts b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found


GRAPH = {name: imports(path, modules()) - {name} for name, path in modules().items()}


def test_no_import_cycles():
    try:
        list(TopologicalSorter(GRAPH).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize(("package", "allowed"), [
    ("models", ("models", "stream_app.core")),
    ("producers", ("producers", "stream_app.core", "stream_app.io")),
    ("stream_app.core", ("stream_app.core",)),
    ("stream_app.io", ("stream_app.core", "stream_app.io", "models.base")),
])
def test_lower_layers_import_only_below_them(package, allowed):
    wrong = {name: sorted(d for d in deps if not d.startswith(allowed))
             for name, deps in GRAPH.items() if name.startswith(package)}
    assert not {n: d for n, d in wrong.items() if d}, f"{package} reaches above its layer"


def test_only_the_command_line_imports_the_dev_tools():
    users = sorted(name for name, deps in GRAPH.items()
                   if not name.startswith("stream_app.dev") and any(d.startswith("stream_app.dev") for d in deps))
    assert users == ["stream_app.cli"]


def test_each_folder_says_what_it_owns():
    for package in [p for p in modules() if (ROOT / p.replace(".", "/") / "__init__.py").exists()]:
        doc = ast.get_docstring(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text()))
        assert doc, f"{package}/__init__.py has no docstring saying what the folder owns"
