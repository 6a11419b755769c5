"""The house's rules, read from the source: no import cycles (lazy imports included) and no
import that runs back up the rooms (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import backprop_ninja

ROOT = Path(backprop_ninja.__file__).parent
PACKAGE = "backprop_ninja"

# each room may import the rooms listed after it, never one before it
ROOMS = ["cli", "learning", "training", "plots", "rundir", "checking", "models", "data", "nn",
         "errors"]
# learner templates run in the learner's process: they import nothing of the package but the
# command line that checks them
EXCEPTIONS = {("learning.templates", "cli")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith(PACKAGE):
                target = node.module[len(PACKAGE) + 1:] if node.module != PACKAGE else ""
            else:
                continue
            for alias in node.names:  # `from . import x` imports a module x when there is one
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if resolve(sub) else target)
    return {m for m in found if m and resolve(m)}


def resolve(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in ROOT.rglob("*.py")}


def room(module: str) -> str:
    return module.split(".")[0]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as a path that comes back to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_lazy_import_makes_a_cycle():
    """The cycle check can fail: a lazy import of the loop from distill, as the code once had."""
    edges = graph()
    assert "training.distill" in closure(edges, "training.loop")
    edges["training.distill"] = edges["training.distill"] | {"training.loop"}
    assert find_cycle(edges) is not None


def test_no_import_runs_back_up_the_rooms():
    order = {r: i for i, r in enumerate(ROOMS)}
    wrong = []
    for m, targets in graph().items():
        if room(m) not in order:
            continue
        for t in targets:
            if room(t) not in order or room(t) == room(m):
                continue
            if any(m.startswith(a) and room(t) == b for a, b in EXCEPTIONS):
                continue
            if order[room(t)] < order[room(m)]:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "; ".join(sorted(wrong))


def test_every_module_is_in_a_room():
    top = {room(m) for m in graph() if m}
    assert top <= set(ROOMS) | {"__main__"}, sorted(top - set(ROOMS))


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in edges.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen
