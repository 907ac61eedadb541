"""Structure of the library: short functions and an acyclic import graph.

The import layers themselves are import-linter contracts in pyproject.toml (run by ``lint-imports``
in CI). Its ``acyclic_siblings`` contract finds cycles between the modules of one package; the
module-level check here also finds a cycle through a package's ``__init__`` (a module that imports
its own package, which imports it back), which a check between siblings cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = "converse_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_FUNCTION_LINES = 60


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of every function and method in ``source``.

    The length is the number of source lines the definition spans, from its first decorator (or
    ``def`` line) to its last line: docstring, comments, blank lines and nested functions count.
    A nested function is also reported on its own.
    """
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    found.append((name, first, child.end_lineno - first + 1))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_function_lengths_are_counted_from_the_first_decorator_to_the_last_line():
    source = "@a\n@b\ndef f(x):\n    '''doc'''\n\n    def g():\n        return 1\n    return x\n\n" \
             "class C:\n    def m(self):\n        pass\n"
    assert function_lengths(source) == [("f", 1, 8), ("f.g", 6, 2), ("C.m", 11, 2)]


def test_no_function_is_longer_than_60_lines():
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        for name, line, length in function_lengths(path.read_text(encoding="utf-8")):
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(ROOT.parent)}:{line} {name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines; split them: " + "; ".join(too_long)


def import_cycles(graph: grimp.ImportGraph) -> list[str]:
    """The import cycles of ``graph``, each once: for every import ``a -> b`` with a way back from
    ``b`` to ``a``, the cycle ``a -> b -> ... -> a`` along the shortest way back."""
    cycles, seen = [], set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None and frozenset(back) not in seen:
                seen.add(frozenset(back))
                cycles.append(" -> ".join((importer,) + tuple(back)))
    return cycles


def test_import_cycles_are_found():
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.a"), ("p.c", "p"), ("p", "p.c"), ("p.d", "p.a")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == ["p -> p.c -> p", "p.a -> p.b -> p.a"]


@pytest.fixture(scope="module")
def library_graph() -> grimp.ImportGraph:
    """The imports between the modules of the library (third-party packages left out)."""
    return grimp.build_graph(PACKAGE, cache_dir=None)


def test_no_import_cycles_in_the_library(library_graph):
    cycles = import_cycles(library_graph)
    assert not cycles, "import cycles; break each one: " + "; ".join(cycles)
