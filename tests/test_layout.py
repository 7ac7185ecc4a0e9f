"""The package's layout: folders by family, imports only downwards, no circle (docs/layout.md).

Every import counts, a function-local one too: deferring an import may keep `kdray --help` fast,
never hide a cycle. Pure modules (no kdray import at all: the maths of losses, metrics, the KL
combination, the covariance) sit below everything and may be imported from anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdray"
# Lower numbers are lower layers; a module may import its own layer's and lower ones.
LAYERS = {
    "kdray.config": 0, "kdray.models": 0, "kdray": 0,
    "kdray.runtime": 1,
    "kdray.data": 2, "kdray.preflight": 2,
    "kdray.distill": 3, "kdray.specialists": 3, "kdray.evaluation": 3,
    "kdray.sweep": 4,
    "kdray.pipeline": 5,
    "kdray.submit": 6, "kdray.cli": 6, "kdray.__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The kdray modules `name` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdray") and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kdray"))
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}
PURE = {name for name, targets in GRAPH.items() if not targets and name != "kdray"}


def layer(name: str) -> int:
    prefix = max((key for key in LAYERS if name == key or name.startswith(key + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer():
    assert all(layer(name) is not None for name in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_only_downwards(name):
    upward = sorted(target for target in GRAPH[name] if target not in PURE and layer(target) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports higher modules: {upward}"


def test_no_import_circle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_package_ships_no_test_harness():
    # Fault injection and /proc reading live in tests/; kdray keeps one hook, an environment
    # variable read in one module, the only one that ends a process abruptly.
    assert not [name for name in MODULES if name.endswith((".fault_harness", ".procfs"))]
    sources = {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert [name for name, text in sources.items() if "os._exit" in text] == ["runtime/faults.py"]
    assert [name for name, text in sources.items() if "KDRAY_FAIL_AT_EPOCH" in text] == ["runtime/faults.py"]
