"""The house's rules, read from the source: every `import` of quantcheck's own modules (at the top, inside functions and
under TYPE_CHECKING alike) goes down the layer order the README's map states, and no module reaches itself again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "quantcheck"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "schema"),
    ("stats", "metrics"),
    ("data",),
    ("storage",),
    ("models",),
    ("cost", "scoring"),
    ("backends",),
    ("tasks",),
    ("analysis",),
    ("report",),
    ("interop",),
    ("orchestration",),
    ("config",),
    ("api",),
    ("cli",),
    ("__main__", "__init__"),
]
"""Lowest first. A module imports from its own package and from lower layers; packages of one layer know nothing of
each other."""

ENTRY_POINTS = {"cli", "api", "config", "errors", "__init__", "__main__"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _owner(module: str) -> str:
    """The longest known module that `module` names (a name imported from a module is not one itself)."""
    while module not in MODULES:
        module = module.rpartition(".")[0]
    return module


def imports_of(module: str) -> set[str]:
    """Every quantcheck module `module` imports, wherever the import statement stands."""
    path = MODULES[module]
    return imports_in(path.read_text(), module, module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_in(source: str, module: str, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_owner(alias.name) for alias in node.names if alias.name.startswith("quantcheck")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.startswith("quantcheck"):
                found |= {_owner(f"{base}.{alias.name}") for alias in node.names}
    return found - {module}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(index for index, names in enumerate(LAYERS) if top in names)


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_module_has_a_layer():
    unplaced = sorted({_package(module) for module in MODULES} - {name for names in LAYERS for name in names})
    assert not unplaced, f"packages missing from LAYERS (and from the README's map): {unplaced}"


def test_the_package_top_holds_only_entry_points():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top <= ENTRY_POINTS, f"modules at the package top that belong in a layer: {sorted(top - ENTRY_POINTS)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    upward = [
        target
        for target in sorted(imports_of(module))
        if _package(target) != _package(module) and layer_of(target) >= layer_of(module)
    ]
    assert not upward, f"{module} (layer {layer_of(module)}) imports {upward}, not below it"


def test_no_import_circles():
    graph = {module: imports_of(module) for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_imports_hidden_in_functions_and_type_checking_blocks():
    """The rules above can fail: the analysis layer reaching up into the report, in a function body or for a type."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..report import table\n"
        "def late():\n    import quantcheck.orchestration.runner\n"
    )
    found = imports_in(source, "quantcheck.analysis.verdict", "quantcheck.analysis")
    assert found == {"quantcheck.report.table", "quantcheck.orchestration.runner"}
    assert all(layer_of(target) > layer_of("quantcheck.analysis.verdict") for target in found)
