"""The package map holds: no import cycle between leakhunt's packages and top-level modules
(imports inside functions count too), and renderers never reach back into the loops' live state."""

from __future__ import annotations

import ast
from pathlib import Path

import leakhunt

ROOT = Path(leakhunt.__file__).parent


def _unit(module: str) -> str:
    """leakhunt.trace.bcc -> trace; leakhunt.record -> record; leakhunt -> leakhunt."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports() -> dict[str, dict[str, set[str]]]:
    """{unit: {unit it imports: files that do}}."""
    edges: dict[str, dict[str, set[str]]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("leakhunt.") and _unit(name) != _unit(module):
                    edges.setdefault(_unit(module), {}).setdefault(_unit(name), set()).add(str(rel))
    return edges


def _cycle(edges: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in edges.get(u, {}):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = 2
        path.pop()
        return None

    for u in list(edges):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_cycle_between_packages():
    edges = _imports()
    cycle = _cycle(edges)
    detail = [f"{a} -> {b}: {sorted(edges[a][b])}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, detail


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": {"x"}}, "b": {}}) is None


def test_the_pipeline_points_one_way():
    """Evidence and analysis never import the loops, renderers or commands above them."""
    edges = _imports()
    below = {"proc", "trace", "gdb", "analysis"}
    above = {"investigate", "watch", "render", "report", "commands", "cli"}
    wrong = {(a, b) for a in below for b in edges.get(a, {}) if b in above}
    assert not wrong, {f"{a} -> {b}": sorted(edges[a][b]) for a, b in wrong}
    assert not set(edges.get("render", {})) & {"commands", "cli"}


#: The loops that sample a target: one process goes through them as a tree of one.
LOOPS = ("watch.py", "ci.py", "investigate/loop.py", "investigate/memory.py")


def test_one_process_is_a_tree_of_one():
    """No loop samples one process by a path of its own: none builds a bare Sampler or
    SampleRecorder, and none branches on whether the target is a tree."""
    found = []
    for rel in LOOPS:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Sampler", "SampleRecorder"):
                found.append(f"{rel}:{node.lineno}: {node.func.id}(...)")
            if isinstance(node, (ast.If, ast.IfExp)):
                names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
                if names & {"subprocesses", "tree"}:
                    found.append(f"{rel}:{node.lineno}: if {ast.unparse(node.test)}")
    assert not found, found
