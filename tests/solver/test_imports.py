"""The solver's modules import each other without a cycle (imports inside functions included)."""

import ast
from pathlib import Path

import chita_minimal

SOLVER = Path(chita_minimal.__file__).parent / "solver"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chita_minimal.solver."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[2] for a in node.names if a.name.startswith("chita_minimal.solver.")}
    return names


def test_no_import_cycle_in_the_solver():
    graph = {p.stem: imports_of(p) for p in SOLVER.glob("*.py") if p.stem != "__init__"}
    assert graph["iht_sync_free"] and "iht" not in graph["iht_sync_free"]
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(path + [node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
