"""The three trees of a suite run, and how they are staged.

Roles (:data:`ROLES`):

* ``patched``: the release under test with the series applied (``--megatron``);
* ``vanilla``: the same release without the series (``--vanilla-megatron``): what upstream gives;
* ``base``: the patched tree of the base release, the last release the drift report marked good
  (``--base-megatron``): what "unchanged" means.

:func:`stage` materializes all three (``mla-seam upstream get``) and applies the series
(``mla-seam apply``), each as a subprocess of this interpreter: staging needs GitPython, running
the phases does not. What the release's pair comes from is a :class:`Source`: a release from
the mla-seam cache (PyPI sdists or a git URL), a moving target's commit (a new tag, ``main``, a
branch) from the upstream URL, or a ``git archive`` of its ``megatron/`` folder.

A tree's tag names its results folder: ``core_v<version>`` for a release, the moving target's
name (``dev``) for a tree the series of one was applied to (the tree's mla-seam state says which;
dev's package_info says 0.19.0, which would file its results as that release's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

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


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the upstream content of a vanilla/patched pair of trees comes from.

    One of: a release from the mla-seam cache (``release``: a PyPI sdist or the release's tag),
    a commit fetched from ``url`` (a new tag, upstream ``main``, a branch; without a URL the
    release ``release`` stands in for it), or a ``git archive`` of ``megatron/`` (``archive``).

    Attributes:
        name: What the trees' folders are called after: ``vanilla-<name>``, ``patched-<name>``.
        release: A version, tag or line (a line means its newest release).
        commit: A commit of ``url``.
        url: Where ``commit`` is fetched from.
        archive: A tar (``.tar``, ``.tar.gz``) holding ``megatron/`` at its top, as
            ``git archive -o dev.tar.gz origin/dev megatron`` writes it.
    """

    name: str
    release: Optional[str] = None
    commit: Optional[str] = None
    url: Optional[str] = None
    archive: Optional[Path] = None

    @classmethod
    def of_release(cls, release: str) -> "Source":
        """A release from the cache; its trees are ``vanilla-<version>``, ``patched-<version>``."""
        return cls(releases.version_of_tag(release), release=release)

    @classmethod
    def of_commit(
        cls, name: str, commit: str, url: Optional[str], version: Optional[str] = None
    ) -> "Source":
        """A moving target's commit from ``url`` (``version``: the release to use without one)."""
        slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
        return cls(slug, release=version, commit=commit, url=url)

    @classmethod
    def of_archive(cls, archive: os.PathLike) -> "Source":
        """A ``git archive`` of ``megatron/``, named after its file (``dev.tar.gz``: ``dev``)."""
        path = Path(archive)
        return cls(path.name.split(".")[0], archive=path)

    def fetch(self, dest: Path) -> None:
        """Materialize the vanilla content into ``dest``.

        Raises:
            UsageError: An unreadable archive, one without ``megatron/core``, or a commit with
                neither a URL nor a release to stand in for it.
            UpstreamError: ``mla-seam upstream get`` failed.
        """
        if self.archive is not None:
            _unpack(self.archive, dest)
        elif self.commit and self.url:
            _seam("upstream", "get", self.commit, "--url", self.url, "--into", str(dest))
        elif self.release:
            _seam("upstream", "get", "--into", str(dest), self.release)
        else:
            raise UsageError(
                f"{self.name}: no upstream URL and no release version to stage it from",
                "run the nightly's CPU phase on a clone (--megatron CLONE --remote origin)",
            )


def stage(
    what: Union[str, Source],
    base: Optional[str],
    work: Path,
    bundle: Optional[Path] = None,
) -> Dict[str, Path]:
    """Materialize the trees of a three-tree run under ``work`` (each reused when already there).

    The one staging function: a release (the cache), a moving target's commit (its URL) or a
    ``git archive`` (:class:`Source`) gives the vanilla and the patched tree, the patched one
    with ``bundle``'s series (``None``: the installed one; for an archive or a moving target, the
    series the content selects); the base release's patched tree has the installed series.

    Args:
        what: The release under test (version, tag or line), or a :class:`Source`.
        base: Version of the base release; ``None``: no base tree. The release itself: the
            patched tree is also the base (measured once; see the suite's runner).
        work: Folder for ``<role>-<name>`` trees.
        bundle: The series and adapter for the patched tree (``MLA_SEAM_ROOT``), e.g. a
            proposal's.

    Returns:
        ``{role: path}``.

    Raises:
        UsageError: A source that cannot be staged (see :meth:`Source.fetch`).
        UpstreamError: A tree could not be fetched or patched.
    """
    source = what if isinstance(what, Source) else Source.of_release(what)
    work.mkdir(parents=True, exist_ok=True)
    trees = {role: _stage_tree(source, role, work, bundle) for role in ("vanilla", "patched")}
    if base and source.release and source.commit is None and _same(base, source.release):
        trees["base"] = trees["patched"]
    elif base:
        trees["base"] = _stage_tree(Source.of_release(base), "patched", work, None)
    return trees


def _same(one: str, other: str) -> bool:
    return releases.version_of_tag(one) == releases.version_of_tag(other)


def _stage_tree(source: Source, role: str, work: Path, bundle: Optional[Path]) -> Path:
    """``work/<role>-<name>``: fetched unless it holds ``megatron/core``, patched for ``patched``."""
    dest = work / f"{role}-{source.name}"
    if not (dest / "megatron" / "core").is_dir():
        log.info("mla-seam suite: staging %s (%s) in %s", role, source.name, dest)
        source.fetch(dest)
    if role == "patched" and not (dest / ADAPTER_RELPATH).is_file():
        _seam("apply", str(dest), bundle=bundle)
    return dest


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a ``git archive`` of ``megatron/`` into ``dest``.

    Raises:
        UsageError: The archive is unreadable or holds no ``megatron/core``.
    """
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
