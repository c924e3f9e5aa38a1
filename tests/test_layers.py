"""The package's imports go one way: cli → runner → {methods, suites, models, evaluation, store, reports} → core.

Every ``import mergebench.…`` in every module (at the top or inside a function) is an edge. The test fails
on a cycle among modules, or on an edge against the layers: a package may import its own modules, any
package of a lower layer, and nothing beside it, except that reports read the store and use the
evaluation metrics, and methods use the alignment package, which re-estimates BatchNorm statistics as evaluation does.
Starting a command imports none of the libraries that take seconds to import and that only some methods use.
"""

import ast
import subprocess
import sys
from pathlib import Path

import mergebench

PACKAGE = Path(mergebench.__file__).resolve().parent
LAYERS = {"cli": 4, "runner": 3, "methods": 2, "suites": 2, "models": 2, "evaluation": 2, "store": 2, "reports": 2, "alignment": 2, "core": 1, "errors": 0}
SIDEWAYS = {("reports", "store"), ("reports", "evaluation"), ("methods", "alignment"), ("alignment", "evaluation")}
"""Edges between packages of one layer that the design allows."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: {mergebench modules it imports}}``; ``from mergebench.x import name`` counts ``mergebench.x.name``
    when that is a module, else ``mergebench.x``."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.startswith("mergebench")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergebench"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    edges.add(child if child in modules else node.module)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mergebench"


def test_every_package_has_a_layer():
    packages = {package_of(module) for module in imports()} - {"mergebench"}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


def violations(graph: dict[str, set[str]]) -> list[str]:
    """The edges of ``graph`` that go against the layers."""
    wrong = []
    for module, edges in graph.items():
        source = package_of(module)
        if source == "mergebench":  # the package's own __init__ (its version)
            continue
        for edge in edges:
            target = package_of(edge)
            if target == "mergebench" or target == source or (source, target) in SIDEWAYS:
                continue
            if LAYERS[target] >= LAYERS[source]:
                wrong.append(f"{module} imports {edge}")
    return sorted(wrong)


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for edge in sorted(graph.get(module, ())):
            if state.get(edge) == 1:
                return path[path.index(edge):] + [edge]
            if edge not in state:
                cycle = visit(edge)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_imports_follow_the_layers():
    wrong = violations(imports())
    assert not wrong, "imports against cli → runner → {methods, suites, models, evaluation, store, reports} → core:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycle = cycle_in(imports())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checks_catch_wrong_edges_and_cycles():
    graph = {
        "mergebench.methods.ties": {"mergebench.runner.sweep", "mergebench.core.task_vectors"},
        "mergebench.core.streaming": {"mergebench.methods.registry"},
        "mergebench.suites.schema": {"mergebench.evaluation.metrics"},
        "mergebench.reports.tables": {"mergebench.store.database", "mergebench.evaluation.metrics"},
        "mergebench.cli": {"mergebench.runner.sweep"},
    }
    assert violations(graph) == [
        "mergebench.core.streaming imports mergebench.methods.registry",
        "mergebench.methods.ties imports mergebench.runner.sweep",
        "mergebench.suites.schema imports mergebench.evaluation.metrics",
    ]
    assert cycle_in(graph) is None
    graph["mergebench.runner.sweep"] = {"mergebench.runner.catalog"}
    graph["mergebench.runner.catalog"] = {"mergebench.runner.sweep"}
    assert cycle_in(graph) == ["mergebench.runner.sweep", "mergebench.runner.catalog", "mergebench.runner.sweep"]


SLOW_TO_IMPORT = ("ot", "sklearn", "scipy.stats", "scipy.optimize", "pandas")
"""Libraries that take seconds to import, which only some methods, sources or plots need."""


def test_starting_a_sweep_imports_no_library_that_only_some_methods_need():
    """Every ``mergebench`` command builds the parser (every kind) and a sweep loads every method and a
    trained suite's sources: none of that may import these, or every command starts seconds later."""
    code = ("import sys; from mergebench.cli import build_parser; from mergebench.methods.registry import load_methods; "
            "from mergebench.suites import image_sources; import mergebench.reports.tables; "
            "build_parser(); load_methods(); image_sources._digits_pools(); "
            f"print(','.join(name for name in {SLOW_TO_IMPORT!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
