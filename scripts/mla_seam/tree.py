"""The Megatron tree mla-seam works on, the test hook ``crash_point`` and atomic file writes.

A tree is found from a checkout root, a site-packages-like folder, or the ``megatron`` package
folder itself; its version is read from ``megatron/core/package_info.py`` by parsing, never by
importing. Git work trees and plain folders are handled the same way; only the place of the
state folder differs (:mod:`mla_seam.statefolder`: lock, state record, pristine store and the
commit journal, with the crash-safe commit protocol).

``MLA_SEAM_CRASH_AT=<step>`` makes the process signal itself at a named step
(:data:`CRASH_STEPS`), which is how the tests kill a run at every point of a transaction.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from pathlib import Path
from typing import Optional

import git
from mla_seam import gitlayer, releases
from mla_seam.errors import NotMegatronTreeError, TreeNotFoundError

CRASH_ENV = "MLA_SEAM_CRASH_AT"  # test hook: step name at which the process signals itself
CRASH_SIGNAL_ENV = "MLA_SEAM_CRASH_SIGNAL"  # KILL (default), INT or TERM
CRASH_STEPS = (
    "startup",
    "locked",
    "preflight-done",
    "post-images-built",
    "commits-built",
    "txn-staged",
    "journal-written",
    "replaced:<k>",
    "state-written",
    "head-moved",
    "index-reset",
    "journal-removed",
    "txn-removed",
    "recover-restored:<k>",
    "recover-head-moved",
    "recover-journal-removed",
)


def crash_point(step: str) -> None:
    """Test hook: signal this process at ``step`` when ``MLA_SEAM_CRASH_AT`` names it.

    ``MLA_SEAM_CRASH_SIGNAL=ENOSPC`` raises a "no space left on device" error there instead (a
    write failing on a full disk).
    """
    if os.environ.get(CRASH_ENV) != step:
        return
    name = os.environ.get(CRASH_SIGNAL_ENV, "KILL").upper()
    if name == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {step})")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


# --- the tree ------------------------------------------------------------------------------


def read_version(root: os.PathLike) -> str:
    """``MAJOR.MINOR.PATCH[PRE_RELEASE]`` from ``megatron/core/package_info.py`` (parsed, not run).

    Raises:
        NotMegatronTreeError: the file is missing or does not define the version numbers.
    """
    try:
        return releases.read_version(root)
    except releases.VersionNotFound as exc:
        raise NotMegatronTreeError(
            str(exc), "point mla-seam at a megatron-core checkout or installation of a release"
        ) from None


def _find_root(path: Path) -> Path:
    """The folder that contains ``megatron/core`` for a path the user gave."""
    if (path / "megatron" / "core").is_dir():
        return path  # checkout root or site-packages-like folder
    if path.name == "megatron" and (path / "core").is_dir():
        return path.parent
    if path.name == "core" and path.parent.name == "megatron":
        return path.parent.parent
    raise NotMegatronTreeError(
        f"{path} holds no megatron/core package",
        "pass the Megatron-LM checkout root, the site-packages folder that holds megatron/, "
        "or the megatron package folder itself",
    )


@dataclasses.dataclass(frozen=True)
class MegatronTree:
    """A megatron-core source tree: where it is, which release, git or not, its state folder."""

    root: Path
    version: str
    repo: Optional[git.Repo]
    state_dir: Path

    @classmethod
    def resolve(cls, arg: os.PathLike) -> "MegatronTree":
        """Find the tree for ``arg`` (checkout root, site-packages folder or ``megatron/``).

        Raises:
            TreeNotFoundError: ``arg`` does not exist or is not a folder.
            NotMegatronTreeError: no ``megatron/core`` there, or no readable version.
        """
        path = Path(arg).expanduser()
        if not path.exists():
            raise TreeNotFoundError(f"{path} does not exist", "pass the path of a Megatron-LM tree")
        if not path.is_dir():
            raise TreeNotFoundError(
                f"{path} is not a directory", "pass the folder of a Megatron-LM tree, not a file"
            )
        root = _find_root(path.resolve())
        version = read_version(root)
        repo = gitlayer.open_repo(root)
        state_dir = gitlayer.git_dir(repo) / "mla-seam" if repo is not None else root / ".mla-seam"
        return cls(root=root, version=version, repo=repo, state_dir=state_dir)

    @property
    def is_git(self) -> bool:
        """Whether the tree is the top level of a git work tree."""
        return self.repo is not None

    def describe(self) -> str:
        """``/path (megatron-core 0.16.1, git work tree)`` for messages."""
        kind = "git work tree" if self.is_git else "plain folder"
        return f"{self.root} (megatron-core {self.version}, {kind})"


# --- atomic file helpers -------------------------------------------------------------------


def fsync_dir(path: os.PathLike) -> None:
    """fsync a folder so that renames and deletions in it are durable."""
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create or truncate ``path`` with ``data`` and fsync it (not atomic by itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode & 0o7777)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode & 0o7777)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` all-or-nothing: temp file, fsync, ``os.replace``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- a change to the tree ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
    """One tree file a transaction writes (``new`` bytes) or deletes (``new`` is ``None``)."""

    rel: str
    old_blob: Optional[str]
    new: Optional[bytes]
    new_blob: Optional[str]
