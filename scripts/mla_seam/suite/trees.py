"""The three trees of a suite run, and how they are staged.

Roles (:data:`ROLES`):

* ``patched``: the release under test with the series applied (``--megatron``);
* ``vanilla``: the same release without the series (``--vanilla-megatron``): what upstream gives;
* ``base``: the patched tree of the base release, the last release the drift report marked good
  (``--base-megatron``): what "unchanged" means.

:func:`stage` materializes all three from the mla-seam cache (``mla-seam upstream get``, PyPI
sdists or a git URL) and applies the series (``mla-seam apply``), each as a subprocess of this
interpreter: staging needs GitPython, running the phases does not. :func:`stage_archive` does the
same for a moving target (``main``, ``dev``) from a ``git archive`` of its ``megatron/`` folder.

A tree's tag names its results folder: ``core_v<version>`` for a release, the moving target's
name (``dev``) for a tree the series of one was applied to (the tree's mla-seam state says which;
dev's package_info says 0.19.0, which would file its results as that release's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mla_seam import releases
from mla_seam.errors import NotMegatronTreeError, TreeNotFoundError, UpstreamError, UsageError
from mla_seam.paths import ADAPTER_RELPATH

log = logging.getLogger(__name__)

ROLES = ("patched", "vanilla", "base")
#: Side of each role's records (``MLA_SEAM_SIDE``): the tests know patched and vanilla only.
SIDE = {"patched": "patched", "vanilla": "vanilla", "base": "patched"}
#: Base release when neither ``--base`` nor a drift report names one: the first release whose
#: patched GPU suite passed on a GPU (results/core_v0.16.1).
DEFAULT_BASE = "0.16.1"

# --- trees ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeInfo:
    """A Megatron tree the suite runs in."""

    path: str
    version: str
    tag: str
    patched: bool

    def as_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


def inspect_tree(path: os.PathLike, role: str) -> TreeInfo:
    """Version and patched state of a Megatron tree.

    Raises:
        TreeNotFoundError: ``path`` is not a directory.
        NotMegatronTreeError: it holds no ``megatron/core`` (or no readable version).
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise TreeNotFoundError(f"{role} {path} is not a directory", "pass a Megatron checkout")
    if not (root / "megatron" / "core").is_dir():
        raise NotMegatronTreeError(
            f"{role} {root} holds no megatron/core package", "pass the Megatron-LM checkout root"
        )
    version = read_version(root)
    patched = (root / ADAPTER_RELPATH).is_file()
    line = applied_line(root) if patched else None
    tag = line if line in releases.MOVING_TARGETS else releases.tag_of(version)
    return TreeInfo(str(root), version, tag, patched)


def applied_line(root: Path) -> Optional[str]:
    """The series line the tree's mla-seam state records as applied (``None``: none recorded).

    Read without git (the suite runs where GitPython may be missing): the state folder is
    ``.mla-seam/`` of a plain folder, ``.git/mla-seam/`` of a checkout, or ``mla-seam/`` in the
    git dir a worktree's ``.git`` file names.
    """
    dot_git = root / ".git"
    folders = [root / ".mla-seam", dot_git / "mla-seam"]
    if dot_git.is_file():
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            folders.append((root / text.split(":", 1)[1].strip()) / "mla-seam")
    for folder in folders:
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        line = ((state or {}).get("applied") or {}).get("line") if isinstance(state, dict) else None
        return line if isinstance(line, str) else None
    return None


def read_version(root: Path) -> str:
    """The tree's megatron-core version (:func:`mla_seam.releases.read_version`).

    Raises:
        NotMegatronTreeError: The file is missing or defines no version numbers.
    """
    try:
        return releases.read_version(root)
    except releases.VersionNotFound as exc:
        raise NotMegatronTreeError(str(exc), "pass a megatron-core tree") from None


def version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def base_from_report(report: Optional[Dict[str, Any]], release: str) -> Optional[str]:
    """The last release a drift report marked good, other than ``release`` (``None``: none).

    Good: the tag's verdict is ``supported`` and its GPU verdict, where there is one, is
    ``pass``. Releases with a GPU pass win over releases with no GPU verdict yet; among equals
    the newest one.
    """
    if not report:
        return None
    ranked = []
    for entry in report.get("tags") or []:
        version = str(entry.get("version") or "")
        if not version or version == release or releases.is_prerelease(version):
            continue
        if entry.get("verdict") != "supported" or not str(entry.get("tag", "")).startswith(
            releases.TAG_PREFIX
        ):
            continue
        gpu = entry.get("gpu") or {}
        if gpu and gpu.get("verdict") != "pass":
            continue
        ranked.append((bool(gpu), releases.version_key(version), version))
    return max(ranked)[2] if ranked else None


def choose_base(
    release: str, base: Optional[str] = None, base_from: Optional[os.PathLike] = None
) -> Optional[str]:
    """The base release of a three-tree run of ``release``.

    ``base`` when given (``"none"``: no base tree), else the last release the drift report
    ``base_from`` marked good (:func:`base_from_report`), else :data:`DEFAULT_BASE`.

    Raises:
        UsageError: ``base_from`` is not a readable JSON file.
    """
    if base:
        return None if base == "none" else base
    if base_from:
        try:
            report: Dict[str, Any] = json.loads(Path(base_from).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--base-from {base_from}: not a readable drift.json ({exc})",
                "pass the drift report (results/drift/drift.json) or name --base VERSION",
            ) from None
        found = base_from_report(report, release)
        if found:
            return found
        log.info("mla-seam suite: %s marks no release good; base %s", base_from, DEFAULT_BASE)
    return DEFAULT_BASE


def _seam(*args: str, timeout: int = 900, bundle: Optional[Path] = None) -> str:
    """``python -m mla_seam ARGS``; its stdout (the last line is a path for ``upstream get``).

    ``bundle``: the series and adapter to use (``MLA_SEAM_ROOT``), e.g. a proposal's.
    """
    env = dict(os.environ)
    if bundle is not None:
        env["MLA_SEAM_ROOT"] = str(bundle)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "mla_seam", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UpstreamError(
            f"staging failed: mla-seam {' '.join(args)} exited {proc.returncode}: "
            + " / ".join(tail),
            "stage the trees by hand (mla-seam upstream get --into DIR V; mla-seam apply DIR) "
            "and pass --megatron/--vanilla-megatron/--base-megatron",
        )
    return proc.stdout


def stage(release: str, base: Optional[str], work: Path) -> Dict[str, Path]:
    """Materialize the trees of a three-tree run under ``work`` (reused when already there).

    Args:
        release: Version, tag or line of the release under test (a line means its newest).
        base: Version of the base release; ``None``: no base tree. The release itself: the
            patched tree is also the base (measured once; see the suite's runner).
        work: Folder for ``<role>-<version>`` checkouts.

    Returns:
        ``{role: path}``.

    Raises:
        UpstreamError: A release could not be materialized or patched.
    """
    work.mkdir(parents=True, exist_ok=True)
    plan = {"patched": (release, True), "vanilla": (release, False)}
    if base and releases.version_of_tag(base) != releases.version_of_tag(release):
        plan["base"] = (base, True)
    trees: Dict[str, Path] = {}
    for role, (ref, patched) in plan.items():
        dest = work / f"{'patched' if patched else 'vanilla'}-{releases.version_of_tag(ref)}"
        if not (dest / "megatron" / "core").is_dir():
            log.info("mla-seam suite: staging %s (%s) in %s", role, ref, dest)
            _seam("upstream", "get", "--into", str(dest), ref)
        if patched and not (dest / ADAPTER_RELPATH).is_file():
            _seam("apply", str(dest))
        trees[role] = dest
    if base and "base" not in plan:
        trees["base"] = trees["patched"]
    return trees


def stage_target(
    name: str,
    commit: str,
    work: Path,
    url: Optional[str],
    bundle: Optional[Path],
    base: Optional[str],
    version: Optional[str] = None,
) -> Dict[str, Path]:
    """The three trees of a moving target (a new tag, upstream ``main``, a branch).

    The target's commit is fetched from ``url`` (one commit each for the vanilla and the
    patched tree; without a URL, the release ``version`` from the cache), the patched tree gets
    ``bundle``'s series (a proposal's; ``None``: the installed one), and the base release is
    staged as :func:`stage` does, with the installed series.

    Returns:
        ``{role: path}``.

    Raises:
        UpstreamError: A tree could not be fetched or patched.
    """
    work.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
    trees: Dict[str, Path] = {}
    for role in ("vanilla", "patched"):
        dest = work / f"{role}-{slug}"
        if not (dest / "megatron" / "core").is_dir():
            log.info("mla-seam suite: staging %s (%s %s) in %s", role, name, commit[:12], dest)
            if url:
                _seam("upstream", "get", commit, "--url", url, "--into", str(dest))
            elif version:
                _seam("upstream", "get", "--into", str(dest), version)
            else:
                raise UsageError(
                    f"{name}: no upstream URL and no release version to stage it from",
                    "run the nightly's CPU phase on a clone (--megatron CLONE --remote origin)",
                )
        if role == "patched" and not (dest / ADAPTER_RELPATH).is_file():
            _seam("apply", str(dest), bundle=bundle)
        trees[role] = dest
    if base:
        trees["base"] = stage(base, None, work)["patched"]
    return trees


def stage_archive(archive: os.PathLike, work: Path) -> Dict[str, Path]:
    """The vanilla and patched trees of a moving target from a ``git archive`` of it.

    Args:
        archive: A tar (``.tar``, ``.tar.gz``) holding ``megatron/`` at its top, as
            ``git archive -o dev.tar.gz origin/dev megatron`` writes it.
        work: Folder for ``vanilla-<name>`` and ``patched-<name>`` (``name``: the archive's file
            name without its extensions); reused when already there.

    Returns:
        ``{"patched": path, "vanilla": path}``; the patched tree has the series the content
        selects (``mla-seam apply``), which names its results folder (:func:`inspect_tree`).

    Raises:
        UsageError: The archive is unreadable or holds no ``megatron/core``.
        UpstreamError: The series does not apply.
    """
    archive = Path(archive)
    name = archive.name.split(".")[0]
    work.mkdir(parents=True, exist_ok=True)
    trees = {}
    for role in ("vanilla", "patched"):
        dest = work / f"{role}-{name}"
        if not (dest / "megatron" / "core").is_dir():
            log.info("mla-seam suite: unpacking %s into %s", archive, dest)
            try:
                # The "data" filter (no links out, no absolute paths) where Python has it.
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                with tarfile.open(archive) as tar:
                    tar.extractall(dest, **safe)
            except (OSError, tarfile.TarError) as exc:
                raise UsageError(
                    f"{archive}: not a readable tar archive ({exc})",
                    "make it with: git archive -o NAME.tar.gz REF megatron",
                ) from None
            if not (dest / "megatron" / "core").is_dir():
                raise UsageError(
                    f"{archive} holds no megatron/core at its top",
                    "make it with: git archive -o NAME.tar.gz REF megatron",
                )
        if role == "patched" and not (dest / ADAPTER_RELPATH).is_file():
            _seam("apply", str(dest))
        trees[role] = dest
    return trees
