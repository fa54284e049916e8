"""The package's layers, kept true by reading every module's imports (no import needed).

Bottom to top; a module may import its own layer and the layers below it, never above:

    core -> data -> models -> training -> attacks -> defenses -> report -> experiment -> cli

Own-package imports sit at module top (a function-level import would hide an edge of the
graph), and the graph of modules has no circles.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unbackdoor"
LAYERS = ["core", "data", "models", "training", "attacks", "defenses", "report", "experiment", "cli"]
# Modules outside a layer folder, and the layer each belongs to.
TOP_LEVEL = {"metrics": "attacks", "__init__": "core", "__main__": "cli"}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "cli"  # the package root: the public facade over every layer
    if parts[1] in LAYERS:
        return parts[1]
    return TOP_LEVEL[parts[1]]


def own_imports(path: Path, src: Path = SRC) -> list[tuple[str, int, bool, list[str]]]:
    """(imported unbackdoor module, line, at module top?, names) for every import of our package."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    me = module_name(path, src)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "unbackdoor":
                out.append((mod, node.lineno, id(node) in top, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "unbackdoor":
                    out.append((a.name, node.lineno, id(node) in top, []))
    return out


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        me = module_name(path, src)
        mine = LAYERS.index(layer_of(me))
        for mod, line, at_top, _ in own_imports(path, src):
            where = f"{path.relative_to(src.parent)}:{line}"
            if mod == "unbackdoor" and me != "unbackdoor.__main__":
                bad.append(f"{where}: imports the package root (import the defining module)")
                continue
            theirs = LAYERS.index(layer_of(mod))
            if theirs > mine:
                bad.append(f"{where}: {layer_of(me)} imports {mod} ({layer_of(mod)}, a layer above)")
            if not at_top:
                bad.append(f"{where}: function-level import of {mod}")
    return bad


def cycles(src: Path = SRC) -> list[list[str]]:
    """Circles in the graph of module-level imports (a package's __init__ counts as the package)."""
    graph: dict[str, set[str]] = {}
    names = {module_name(p, src) for p in src.rglob("*.py")}
    for path in src.rglob("*.py"):
        me = module_name(path, src)
        deps = set()
        for mod, _, _, imported in own_imports(path, src):
            deps.add(mod)
            deps.update(f"{mod}.{n}" for n in imported if f"{mod}.{n}" in names)  # "from pkg import sub"
        # importing a package's submodule runs the package's __init__ first, which is not a cycle
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".")}
    found, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return found


def test_no_upward_or_hidden_imports():
    assert violations() == []


def test_no_import_circles():
    assert cycles() == []


@pytest.mark.parametrize("line, expect", [
    ("from unbackdoor.cli.main import main\n", "a layer above"),
    ("def f():\n    from unbackdoor.core.files import read_json\n", "function-level import"),
])
def test_the_check_catches_an_upward_or_hidden_import(tmp_path, line, expect):
    """The same check on a copy of the package with one bad line added to a low layer."""
    import shutil

    copy = tmp_path / "unbackdoor"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "data" / "dataset.py"
    target.write_text(target.read_text() + "\n" + line)
    found = violations(copy)
    assert len(found) == 1 and expect in found[0] and "data/dataset.py" in found[0]


def test_the_cycle_check_catches_a_circle(tmp_path):
    import shutil

    copy = tmp_path / "unbackdoor"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "core" / "errors.py"
    target.write_text(target.read_text() + "\nfrom unbackdoor.core.registry import Registry\n")
    assert any("unbackdoor.core.errors" in c and "unbackdoor.core.registry" in c for c in cycles(copy))
