"""Where mla-seam finds its bundle (patches/, overlay/, tests/gpu) and keeps its caches.

The bundle is the data mla-seam applies: ``patches/<line>/`` (the hook series), ``overlay/``
(the adapter) and ``tests/gpu`` (the GPU suite). It is found, first match wins:

1. ``$MLA_SEAM_ROOT`` (a folder with the repository's layout);
2. the installed package's data, ``mla_seam/_bundle/`` (a wheel carries it, see pyproject.toml),
   reached through :mod:`importlib.resources`;
3. the repository the package lives in (``<root>/scripts/mla_seam``: an editable install).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from mla_seam.errors import BundleError

ADAPTER_RELPATH = "megatron/core/transformer/mla_adapter.py"
ROOT_ENV = "MLA_SEAM_ROOT"
#: The bundle inside an installed package (``mla_seam/_bundle``).
PACKAGE_BUNDLE = "_bundle"
GPU_TESTS = ("tests", "gpu")


def _has_bundle(root: Path) -> bool:
    return (root / "patches").is_dir() and (root / "overlay").is_dir()


def _package_bundle() -> Optional[Path]:
    """``mla_seam/_bundle`` of an installed package, if it exists as a real folder."""
    try:
        resource = importlib.resources.files("mla_seam").joinpath(PACKAGE_BUNDLE)
    except (ModuleNotFoundError, TypeError):
        return None
    path = Path(str(resource))
    return path if path.is_dir() else None


def _installed_root() -> Optional[Path]:
    """The bundle shipped with this mla-seam: package data, else the repository checkout."""
    packaged = _package_bundle()
    if packaged is not None:
        return packaged
    repo = Path(__file__).resolve().parents[2]
    return repo if _has_bundle(repo) else None


def bundle_root() -> Path:
    """The folder holding ``patches/`` and ``overlay/`` (see the module docstring for the order).

    Raises:
        BundleError: no bundle there (a wheel built without its data, a wrong MLA_SEAM_ROOT).
    """
    env = os.environ.get(ROOT_ENV)
    root = Path(env) if env else _installed_root()
    if root is None or not _has_bundle(root):
        where = f"{ROOT_ENV}={env}" if env else f"the installed mla-seam ({Path(__file__).parent})"
        raise BundleError(
            f"no patches/ and overlay/ under {root if root is not None else where}: "
            "mla-seam's bundle is missing",
            f"reinstall mla-seam from a wheel or sdist built by its own build (pip install "
            f"mla-seam / pip install -e REPO), or set {ROOT_ENV} to an mla-seam repository root",
        )
    return root


def patches_dir() -> Path:
    """``<bundle>/patches``: one sub-folder per supported release line."""
    return bundle_root() / "patches"


def overlay_dir() -> Path:
    """``<bundle>/overlay``: files copied verbatim into the Megatron tree."""
    return bundle_root() / "overlay"


def gpu_tests_dir() -> Path:
    """The folder holding the GPU tests (``tests/gpu`` of the bundle).

    ``$MLA_SEAM_ROOT`` wins when it has them; otherwise the installed bundle's copy.

    Raises:
        BundleError: no bundle carries the GPU tests.
    """
    candidates: List[Path] = []
    env = os.environ.get(ROOT_ENV)
    if env:
        candidates.append(Path(env))
    installed = _installed_root()
    if installed is not None:
        candidates.append(installed)
    for root in candidates:
        folder = root.joinpath(*GPU_TESTS)
        if folder.is_dir():
            return folder
    raise BundleError(
        "the GPU tests (tests/gpu) are not in mla-seam's bundle",
        "reinstall mla-seam from a wheel built by its own build, or set MLA_SEAM_ROOT to an "
        "mla-seam repository root",
    )


def check_bundle() -> Path:
    """The bundle root, checked before anything else happens: every line folder's manifest
    names the overlay files the bundle carries, with their blob ids.

    Cheap (manifests read as JSON, one hash of the overlay files); the full validation of a
    series happens when it is loaded.

    Raises:
        BundleError: missing bundle, no line folders, overlay files that differ from what the
            manifests recorded (the adapter and the series come from different mla-seam
            versions).
    """
    from mla_seam import gitlayer  # pylint: disable=import-outside-toplevel

    root = bundle_root()
    wanted: Dict[str, Dict[str, str]] = {}  # overlay file -> line -> the blob its manifest says
    lines = sorted(p for p in (root / "patches").iterdir() if p.is_dir())
    if not lines:
        raise BundleError(
            f"{root / 'patches'} holds no release line", "reinstall mla-seam (its bundle is empty)"
        )
    for line in lines:
        try:
            manifest = json.loads((line / "manifest.json").read_bytes())
            overlay = manifest.get("overlay")
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable manifest is the series loader's to report
        if isinstance(overlay, dict):
            for rel, blob in overlay.items():
                if isinstance(blob, str):
                    wanted.setdefault(rel, {})[line.name] = blob
    rels = sorted(wanted)
    blobs = gitlayer.hash_blobs(root / "overlay", [r for r in rels if "/../" not in f"/{r}/"])
    bad = [rel for rel in rels if any(blobs.get(rel) != b for b in wanted[rel].values())]
    if bad:
        lines_bad = sorted({n for r in bad for n, b in wanted[r].items() if blobs.get(r) != b})
        raise BundleError(
            f"overlay/{', overlay/'.join(bad)} "
            f"{'is missing' if all(blobs.get(r) is None for r in bad) else 'does not match'} "
            f"the blob in the manifests under {root / 'patches'} ({', '.join(lines_bad)}): the "
            "adapter and the series come from different mla-seam versions",
            "reinstall mla-seam; in a repository, re-export the series with "
            "`mla-seam rebase --write --refresh-overlay` or restore overlay/ from git",
        )
    return root


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
