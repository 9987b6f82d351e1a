"""Where mla-seam finds its bundle (patches/, overlay/) and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from mla_seam.errors import SeriesCorruptError

ADAPTER_RELPATH = "megatron/core/transformer/mla_adapter.py"


def bundle_root() -> Path:
    """The folder holding ``patches/`` and ``overlay/``.

    ``MLA_SEAM_ROOT`` wins; otherwise the repository this package was installed from (the
    package lives at ``<root>/scripts/mla_seam``, installed editable by ``scripts/apply.sh``).
    """
    env = os.environ.get("MLA_SEAM_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (root / "patches").is_dir() or not (root / "overlay").is_dir():
        raise SeriesCorruptError(
            f"no patches/ and overlay/ under {root}",
            "install mla-seam editable from its repository (pip install -e .) "
            "or set MLA_SEAM_ROOT to the repository root",
        )
    return root


def patches_dir() -> Path:
    """``<bundle>/patches``: one sub-folder per supported release line."""
    return bundle_root() / "patches"


def overlay_dir() -> Path:
    """``<bundle>/overlay``: files copied verbatim into the Megatron tree."""
    return bundle_root() / "overlay"


def cache_dir() -> Path:
    """Cache for sdists and materialized checkouts (``MLA_SEAM_CACHE`` or XDG cache)."""
    env = os.environ.get("MLA_SEAM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mla-seam"


def gpu_tests_dir() -> Path:
    """``<bundle>/tests/gpu``: the GPU suite's test files (``mla-seam suite`` runs them)."""
    return bundle_root() / "tests" / "gpu"
