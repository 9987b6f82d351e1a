"""The overlay must read like Megatron's own code, under Megatron's own tool settings.

The settings are those of the upstream tags (``pyproject.toml`` and ``.pylintrc`` of
core_v0.13.1 .. core_v0.19.0, identical in what they check), written out here so the test needs
no upstream checkout: black (line length 100, no string normalization, no magic trailing comma),
isort (black profile, ``megatron`` first party, ``transformer_engine`` third party), pylint with
only the messages Megatron enables (missing class/function docstrings, unused imports, long
lines, possibly-used-before-assignment, ``print``). Beyond the tools: no classes built with
``type()``, nothing written into ``globals()``, and the one adapter file is all the overlay adds.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = sorted((ROOT / "overlay").rglob("*.py"))

BLACK = ["--check", "--quiet", "--line-length", "100", "--skip-string-normalization"]
BLACK += ["--skip-magic-trailing-comma"]
ISORT = ["--check-only", "--quiet", "--profile", "black", "--line-length", "100"]
ISORT += ["-p", "megatron", "-o", "transformer_engine"]
ISORT += ["--py", "310"]
#: Megatron's .pylintrc: disable=all, enable=C0115,C0116,W0611,C0301,E0606,W0141 (print).
PYLINT = ["--disable=all", "--enable=C0115,C0116,W0611,C0301,E0606,W0141"]
PYLINT += ["--max-line-length=100", "--load-plugins=pylint.extensions.bad_builtin"]
PYLINT += ["--bad-functions=print", "--score=n"]


def test_overlay_is_only_the_adapter():
    assert [p.relative_to(ROOT / "overlay").as_posix() for p in OVERLAY] == [
        "megatron/core/transformer/mla_adapter.py"
    ]


@pytest.mark.parametrize("tool,args", [("black", BLACK), ("isort", ISORT), ("pylint", PYLINT)])
def test_megatrons_tools_accept_the_overlay(tool, args):
    pytest.importorskip(tool, reason=f"{tool} is a test extra (pip install -e .[test])")
    result = subprocess.run(
        [sys.executable, "-m", tool, *args, *map(str, OVERLAY)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", OVERLAY, ids=lambda p: p.name)
def test_no_print_and_every_public_function_documented(path):
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert not [c for c in calls if getattr(c.func, "id", None) == "print"]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            assert ast.get_docstring(node), f"{node.name} has no docstring"
            if isinstance(node, ast.FunctionDef) and node.name != "forward":
                assert node.returns is not None or node.name == "__init__", node.name


@pytest.mark.parametrize("path", OVERLAY, ids=lambda p: p.name)
def test_classes_are_declared_statically(path):
    """No ``type(name, bases, ns)`` class factories and no writes into ``globals()``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "type":
            assert len(node.args) < 3, f"line {node.lineno}: a class built with type()"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "globals":
            raise AssertionError(f"line {node.lineno}: globals() in the adapter")


@pytest.mark.parametrize("path", OVERLAY, ids=lambda p: p.name)
def test_signatures_name_real_types(path):
    """Public functions take Megatron's types (TYPE_CHECKING imports), not ``Any`` configs."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        for arg in node.args.args:
            if arg.arg in ("config", "attention", "packed_seq_params"):
                assert ast.unparse(arg.annotation) != "Any", f"{node.name}({arg.arg}: Any)"
