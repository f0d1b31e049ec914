"""The package's layout: no import cycles between its modules, no private names imported across modules.

The graph is read from the source, every `import` counted: at module level, inside functions (the lazy imports
that keep start-up fast) and under TYPE_CHECKING. A cycle in any of them means two modules that cannot be
understood, tested or moved one without the other.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neftune_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every neftune_cli import in a file; `from pkg import submodule` counts as the submodule."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("neftune_cli")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neftune_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (node.module, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imported(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_recipe_schema_is_a_leaf():
    """Every stage depends on the schema; it depends on nothing of ours (no disk or hub access either)."""
    assert graph()["neftune_cli.recipe.schema"] == set()


def test_no_private_names_across_modules():
    private = [f"{module_name(path)}: {module}.{name}" for path in MODULES.values()
               for module, name in imported(path) if name and name.startswith("_") and name != "__version__"]
    assert private == []


def test_every_module_imports_alone():
    """Each module in a fresh interpreter (an import that works only after another module ran would fail here).
    One interpreter imports them one by one, dropping our modules from sys.modules before each."""
    names = [n for n in MODULES if n != "neftune_cli.__main__"]  # __main__ runs the CLI
    script = (f"import importlib, sys\nfor name in {names!r}:\n"
              "    for loaded in [m for m in sys.modules if m.startswith('neftune_cli')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_package_folders_are_stages():
    """Each sub-package says in its docstring what stage it is."""
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "neftune_cli":
            assert importlib.import_module(name).__doc__, f"{name} has no docstring"
