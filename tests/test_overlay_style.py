"""The overlay must read like Megatron's own code: black 100, isort black profile, no print."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = sorted((ROOT / "overlay").rglob("*.py"))


def test_overlay_is_only_the_adapter():
    assert [p.relative_to(ROOT / "overlay").as_posix() for p in OVERLAY] == [
        "megatron/core/transformer/mla_adapter.py"
    ]


@pytest.mark.parametrize(
    "tool,args",
    [
        ("black", ["--check", "--quiet", "--line-length", "100", "--skip-string-normalization"]),
        ("isort", ["--check-only", "--quiet", "--profile", "black", "--line-length", "100"]),
    ],
)
def test_formatters_accept_the_overlay(tool, args):
    pytest.importorskip(tool)
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
