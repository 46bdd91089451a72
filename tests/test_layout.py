"""The house's picture of its imports: floors from the disk and array helpers up to the entry
scripts, two wings (pretraining views, downstream) that never import each other, tools and
benchmarks as leaves, no cycle."""

import ast
import os

from tests.helpers import ROOT

# the floor of each top-level module or package: an import may only run to the same floor or below
FLOORS = {
    "preprocessing": 0,  # disk, the network-input contract, resampling, the DeepLesion steps
    "models": 1,
    "utils": 2,
    "loss": 2,
    "augment": 2,
    "dataset": 3,
    "downstream": 3,
    "main_desd": 4,
    "finetune": 4,
    "predict": 4,
    "evaluate": 4,
    "tools": 5,
    "benchmarks": 5,
}
PRETRAINING_WING = {"augment", "dataset", "loss"}
DOWNSTREAM_WING = {"downstream"}
SKIP = {".venv", ".git", "tests", "results", "build", "__pycache__"}


def project_files() -> dict[str, str]:
    """Dotted module name -> path, for every project module outside the tests."""
    out = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def imports_of(path: str, modules: set[str]) -> set[str]:
    """The project modules that the file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = project_files()
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def top(module: str) -> str:
    """The floor's name: `models.res3d` -> `models`; `main_desd` -> `main_desd`."""
    return module.split(".")[0]


def test_every_module_has_a_floor():
    assert {top(m) for m in project_files()} <= set(FLOORS)


def test_no_import_runs_from_a_lower_floor_to_a_higher_one():
    upward = [f"{m} -> {i}" for m, deps in graph().items() for i in deps if FLOORS[top(i)] > FLOORS[top(m)]]
    assert not upward


def test_the_two_wings_never_import_each_other_and_tools_are_leaves():
    g = graph()
    crossing = [
        f"{m} -> {i}" for m, deps in g.items() for i in deps if {top(m), top(i)} & PRETRAINING_WING and {top(m), top(i)} & DOWNSTREAM_WING
    ]
    into_leaves = [f"{m} -> {i}" for m, deps in g.items() for i in deps if top(i) in {"tools", "benchmarks"} and FLOORS[top(m)] < 5]
    assert not crossing and not into_leaves


def test_the_import_graph_has_no_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for i in sorted(g[m]):
            if state.get(i) == "open":
                cycles.append(" -> ".join([*path[path.index(i) :], i]))
            elif i not in state:
                visit(i, [*path, i])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles
