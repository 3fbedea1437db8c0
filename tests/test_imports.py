"""The core package's modules import one another without a cycle, counting the imports made
inside functions too (a cycle hidden in a function still ties the modules together)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shared" / "faceflow"


def imports_of(path: Path) -> set[str]:
    """The faceflow modules a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:          # from .x import y / from . import x, y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "faceflow":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("faceflow.") and "." in a.name)
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    edges = {p.stem: imports_of(p) for p in tmp_path.glob("*.py")}
    assert find_cycle(edges) == ["a", "b", "a"]


def test_no_import_cycle_in_the_core_package():
    edges = graph()
    assert {"engine", "video", "chunks", "pipeline"} <= set(edges)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_core_package_never_imports_its_http_surface():
    # faceflow.web (the HTTP API's models and routes, `faceflow serve`) sits on top of the core
    # like the CLI: the core must import without Powertools, pydantic or aiohttp.
    importers = sorted(name for name, path in ((p.stem, p) for p in PACKAGE.glob("*.py"))
                       if name not in ("__init__", "cli") and "web" in imports_of(path))
    assert importers == []
