"""The tool's import graph: every module imports on its own, no import circle, faces only export.

The graph is read from the source (``ast``): an edge for every ``import`` and ``from ... import``
of an mla_seam module, at module level or inside a function (a late import closes a circle as
well as an early one). ``from PACKAGE import NAME`` is an edge to ``PACKAGE.NAME`` where that is a
module, else to the package's face (its ``__init__``). Python's own loading of a parent package
before its submodule is not an edge: every package does that.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scripts" / "mla_seam"
#: Packages whose face (``__init__.py``) re-exports its modules and implements nothing.
FACES = ("mla_seam.suite", "mla_seam.suite.dist")


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """``{dotted name: (file, is a package face)}`` of every module under ``scripts/mla_seam``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        face = parts[-1] == "__init__"
        found[".".join(parts[:-1] if face else parts)] = (path, face)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """``{module: modules it imports}`` (mla_seam modules only)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, (path, face) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    here = name.split(".") if face else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    source = ".".join(here + ([node.module] if node.module else []))
                if source not in modules:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    graph[name].add(sub if sub in modules else source)
        graph[name].discard(name)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_finds_a_circle():
    """The check can fail: a made-up circle through a package face is found."""
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": {"p.a"}}
    assert cycles(graph) == [["p", "p.a", "p.b"]]
    assert cycles({"p": {"p.a"}, "p.a": set()}) == []


def test_the_tool_has_no_import_circle():
    graph = import_graph()
    assert "mla_seam.suite.dist.runner" in graph and graph["mla_seam.suite.dist.runner"]
    assert cycles(graph) == [], "import circle(s) in scripts/mla_seam"


@pytest.mark.parametrize("face", FACES)
def test_package_faces_export_and_nothing_inside_imports_them(face):
    graph = import_graph()
    path, is_face = _modules()[face]
    assert is_face
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = [
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    assert defined == [], f"{face}'s face implements {defined}: move them into a module"
    inside = [m for m, targets in graph.items() if m.startswith(face + ".") and face in targets]
    assert inside == [], f"{inside} import their own package's face {face}"


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module, in a new interpreter that no other test has imported anything into."""
    names = [n for n in _modules() if not n.endswith(".__main__")]
    code = (
        "import importlib, json, sys\n"
        "bad = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:  # noqa: BLE001\n"
        "        bad[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}
    assert len(names) > 60
