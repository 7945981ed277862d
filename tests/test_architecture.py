"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Two rules (issue 15): the core -- every module outside ``diffpo/toy`` -- imports nothing from the
shapes world, at module level or inside a function (the world plugs in through the registries,
``diffpo.plugins``); and the module-level imports of ``diffpo`` form no cycle, so any module can be
imported first.

Edges: ``import diffpo.a.b`` and ``from diffpo.a import b`` (``b`` a module) point at ``diffpo.a.b``;
``from diffpo.a import name`` points at ``diffpo.a``. Imports under ``if TYPE_CHECKING:`` are not
run and are left out of the cycle check (they still count for the shapes-world rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffpo"
WORLD = "diffpo.toy"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported diffpo module, line, runs at import time) for every import statement of ``path``."""
    name = next(n for n, p in modules.items() if p == path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, module_level) for a in child.names if a.name.split(".")[0] == "diffpo")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.split(".")[0] != "diffpo":
                    continue
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.append((target if target in modules else base, child.lineno, module_level))
            else:
                visit(child, module_level)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return found


def in_world(module: str) -> bool:
    return module == WORLD or module.startswith(WORLD + ".")


def core_imports_of_world(modules: dict[str, Path]) -> list[str]:
    return [
        f"{name.replace('.', '/')}{'/__init__' if path.name == '__init__.py' else ''}.py:{line} imports {target}"
        for name, path in modules.items()
        if not in_world(name)
        for target, line, _ in imports(path, modules)
        if in_world(target)
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def module_level_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {
        name: {target for target, _, module_level in imports(path, modules) if module_level and target in modules and target != name}
        for name, path in modules.items()
    }


def test_the_core_imports_nothing_from_the_shapes_world() -> None:
    offending = core_imports_of_world(package_modules())
    assert not offending, "the core reaches into diffpo.toy (register through diffpo.plugins instead):\n" + "\n".join(offending)


def test_module_level_imports_have_no_cycle() -> None:
    cycle = find_cycle(module_level_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_what_they_guard(tmp_path: Path) -> None:
    """The parser finds both kinds of offence in a small fake package: a function-level import of
    the world from the core, a relative import, and a three-module cycle."""
    root = tmp_path / "diffpo"
    (root / "toy").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "toy/__init__.py": "",
        "toy/grammar.py": "VOCAB = []\n",
        "a.py": "from diffpo import b\n",
        "b.py": "import diffpo.c as c\n\ndef f():\n    from diffpo.toy.grammar import VOCAB\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffpo import b\nfrom . import a\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    modules = package_modules(root)
    assert core_imports_of_world(modules) == ["diffpo/b.py:4 imports diffpo.toy.grammar"]
    assert find_cycle(module_level_graph(modules)) == ["diffpo.a", "diffpo.b", "diffpo.c", "diffpo.a"]
    (root / "c.py").write_text("def g():\n    from . import a\n")  # inside a function: no cycle
    assert find_cycle(module_level_graph(package_modules(root))) is None


@pytest.mark.parametrize("module", ["diffpo.models", "diffpo.evaluate.scorers", "diffpo.tiny"])
def test_core_modules_are_importable_without_the_world(module: str, tmp_path: Path) -> None:
    """At run time too: with ``diffpo.toy`` made unimportable, the core modules that used to reach
    into it import, and the tiny models build (they need only the core's word tokenizer)."""
    import subprocess
    import sys

    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {WORLD!r} or name.startswith({WORLD!r} + '.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
        "if 'tiny' in " + repr(module) + ":\n"
        "    from diffpo.tiny import tiny_builder\n"
        "    tiny_builder('sd')()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
