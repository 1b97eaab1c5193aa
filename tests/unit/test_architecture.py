"""The layering the design rests on, checked on the source: no import cycles, models/ free of the transport.

Every import counts: module level, inside functions, under ``TYPE_CHECKING`` and
``importlib.import_module("...")`` with a literal name, because each is a dependency a
reader must follow.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = {"cvserve": ROOT / "service", "cvserve.models": ROOT / "models"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in TREES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if "_proto" in rel.parts or (package == "cvserve" and rel.parts[0] == "models"):
                continue
            parts = [*rel.parent.parts] + ([] if path.stem == "__init__" else [path.stem])
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imported(path: Path, module: str) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            # ``from package import module`` depends on the module; ``from module import name``
            # on the module only.
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph[module] = {name for name in _imported(path, module) if name in MODULES and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_import_cycles() -> None:
    # A package's __init__ re-exporting its submodules, and a submodule importing its package,
    # are one unit, not a dependency cycle between parts.
    graph = {
        m: {
            d
            for d in deps
            if not (_is_package(m) and d.startswith(m + "."))
            and not (_is_package(d) and m.startswith(d + "."))
        }
        for m, deps in _graph().items()
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_models_never_import_the_transport() -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("cvserve.models"):
            continue
        for name in _imported(path, module):
            top = name.split(".")[0]
            outside = name.startswith("cvserve.") and not name.startswith("cvserve.models")
            if top in ("grpc", "ray") or outside:
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def test_the_registry_imports_none_of_its_plugins() -> None:
    deps = _graph()["cvserve.models.registry"]
    assert deps <= {"cvserve.models.base", "cvserve.models.repository", "cvserve.models.types"}, deps


def test_the_client_imports_no_server_module() -> None:
    # cvserve.models itself (its __init__) and cvserve.models.types import neither torch nor
    # detectron2; tests/unit/service/client/test_client_imports.py checks that in a fresh process.
    allowed = {"cvserve", "cvserve.models", "cvserve.models.types"}
    for module in (m for m in MODULES if m.startswith("cvserve.client")):
        for name in _imported(MODULES[module], module):
            if name.startswith("cvserve") and not name.startswith(("cvserve.client", "cvserve._proto")):
                assert name in allowed, f"{module} imports {name}"


def test_the_distribution_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    proto = {
        "cvserve._proto",
        "cvserve._proto.cvserve",
        "cvserve._proto.cvserve.v1",
        "cvserve._proto.inference",
    }
    assert listed == on_disk | proto
    assert config["package-dir"] == {"cvserve": "service", "cvserve.models": "models"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__init__")))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 330, f"{MODULES[module]}: {lines} lines (about 300 at most)"


def _long_functions(path: Path, limit: int) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            lines -= (first.end_lineno or first.lineno) - first.lineno + 1 if docstring else 0
            if lines > limit:
                yield f"{path}:{node.lineno} {node.name}: {lines} lines"


def test_functions_stay_short() -> None:
    # Docstrings excluded: a function documented well is not the longer for it.
    long = [f for path in MODULES.values() for f in _long_functions(path, 60)]
    assert not long, long
