"""One home for megatron-core release facts: version strings, their order, release lines, tags.

Every module that reads a version out of ``megatron/core/package_info.py``, orders versions,
names a release line (``0.19`` / ``core_v0.19``) or a tag (``core_v0.19.2``) goes through here.
Standard library plus ``packaging`` only: the GPU suite imports it on machines without GitPython.

Version strings in the wild are not only PyPI's. Upstream's own tags carry others
(``0.19.1`` at tag ``core_v0.19.0``, ``0.17.0rc0`` at ``core_v0.17.0``, ``0.20.0`` on main),
and there are ``rc``, ``.devN`` and ``.postN`` builds: all of them belong to their
``MAJOR.MINOR`` line (:func:`line_of`).

Beside the release lines stand upstream's moving targets (:data:`MOVING_TARGETS`: ``main`` and
``dev``), branches served like lines, each by its own series folder named after it. Their
version string is no guide (dev says ``0.19.0``, main ``0.20.0``): a tree gets their series by
content (:mod:`mla_seam.selection`), and a series records the commit it was made from as its one
release, ``dev@d48bd6be0a`` (:func:`snapshot`). The nightly job lands each branch it follows as
``upstream-<branch>`` in its clone (:func:`followed_ref`); such a ref names its moving target
too, so a rebase onto it writes ``patches/<branch>/`` (:func:`series_folder`).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from packaging.version import InvalidVersion, Version

#: Where a tree says which megatron-core it is.
PACKAGE_INFO = "megatron/core/package_info.py"
#: Upstream's release tags: ``core_v0.19.2``; the series folders use ``core_v0.19``.
TAG_PREFIX = "core_v"

#: Upstream's moving targets, served like release lines: the branches frontier MLA models are
#: trained on (DeepSeek-V4 and Kimi-K3 work lands on ``dev`` first; others track ``main``). Each
#: has its own series folder, ``patches/<name>/``. The one home of which moving targets exist:
#: every tool that lists, names or picks lines asks here.
MOVING_TARGETS: Tuple[str, ...] = ("main", "dev")

#: Where the nightly job lands a branch it follows in its clone: ``main`` -> ``upstream-main``
#: (a local branch beside the clone's own ones, never over them).
FOLLOW_PREFIX = "upstream-"

_LINE_RE = re.compile(r"^(?:core_v|v)?(\d+)\.(\d+)$")
_SNAPSHOT_RE = re.compile(r"^([A-Za-z0-9._-]+)@([0-9a-f]{7,40})$")


class VersionNotFound(ValueError):
    """``package_info.py`` is missing or defines no MAJOR/MINOR/PATCH (message says which)."""


def parse_package_info(source: str) -> str:
    """``MAJOR.MINOR.PATCH[PRE_RELEASE]`` from the text of ``package_info.py`` (parsed, not run).

    Raises:
        VersionNotFound: the text does not define the three numbers.
        SyntaxError: the text is not Python.
    """
    values: Dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                with contextlib.suppress(ValueError):
                    values[target.id] = ast.literal_eval(node.value)
    numbers = [values.get(k) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(isinstance(n, int) for n in numbers):
        raise VersionNotFound("does not define MAJOR, MINOR and PATCH numbers")
    pre = values.get("PRE_RELEASE") or ""
    return ".".join(str(n) for n in numbers) + (pre if isinstance(pre, str) else "")


def read_version(root: os.PathLike) -> str:
    """The version of the megatron-core tree at ``root`` (see :func:`parse_package_info`).

    Raises:
        VersionNotFound: the file is missing, unreadable, or defines no version numbers; the
            message names the file.
    """
    path = Path(root) / PACKAGE_INFO
    try:
        return parse_package_info(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VersionNotFound(f"{path} is missing") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, VersionNotFound):
            raise VersionNotFound(f"{path} {exc}") from None
        raise VersionNotFound(f"cannot read {path}: {exc}") from None


def version_key(version: str) -> Tuple[int, object]:
    """Sort key: PEP 440 order; strings that are no version sort after every version."""
    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


def is_prerelease(version: str) -> bool:
    """Whether ``version`` is an rc, alpha, beta or dev build (``0.17.0rc0``, ``0.16.0rc0.dev12``)."""
    try:
        return Version(version).is_prerelease
    except InvalidVersion:
        return False


def line_of(version: str) -> str:
    """The release line of a version: ``0.16.1``, ``0.17.0rc0``, ``0.19.1.post2`` -> ``0.16`` ...

    Lenient: a string that is no PEP 440 version keeps its first two dot-separated fields.
    """
    try:
        release = Version(version).release
    except InvalidVersion:
        return ".".join(version.strip().removeprefix(TAG_PREFIX).split(".")[:2])
    return f"{release[0]}.{release[1] if len(release) > 1 else 0}"


def line_dir_name(line: str) -> str:
    """The series folder of a line: ``0.19`` -> ``core_v0.19`` (a folder name passes through)."""
    parsed = parse_line(line)
    return f"{TAG_PREFIX}{parsed}" if parsed else line


def parse_line(name: str) -> Optional[str]:
    """``core_v0.19``, ``v0.19`` or ``0.19`` -> ``0.19``; anything else -> ``None``."""
    match = _LINE_RE.match(name.strip())
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else None


def tag_of(version: str) -> str:
    """Upstream's tag for an exact version: ``0.16.1`` -> ``core_v0.16.1``."""
    return version if version.startswith(TAG_PREFIX) else f"{TAG_PREFIX}{version}"


def version_of_tag(tag: str) -> str:
    """``core_v0.16.1`` -> ``0.16.1`` (other strings pass through without the prefix)."""
    return tag.strip().removeprefix(TAG_PREFIX)


# --- moving targets ------------------------------------------------------------------------


def followed_ref(branch: str) -> str:
    """Where the nightly lands a followed upstream branch in its clone: ``main`` ->
    ``upstream-main``."""
    return f"{FOLLOW_PREFIX}{branch}"


def followed_branch(ref: str) -> Optional[str]:
    """The upstream branch a ref of :func:`followed_ref` lands (``upstream-main`` and
    ``refs/heads/upstream-main`` -> ``main``), else ``None``."""
    name = ref.strip().removeprefix("refs/heads/")
    if "/" in name or not name.startswith(FOLLOW_PREFIX) or name == FOLLOW_PREFIX:
        return None
    return name[len(FOLLOW_PREFIX) :]


def moving_target(ref: str) -> Optional[str]:
    """The moving target a git ref names, else ``None``.

    ``dev``, ``origin/dev``, ``refs/heads/dev``, ``refs/remotes/upstream/dev`` and the nightly's
    ``upstream-dev`` (:func:`followed_ref`) name ``dev``; ``feature/dev``'s deeper paths, tags
    and commits name none.
    """
    followed = followed_branch(ref)
    if followed is not None:
        return followed if followed in MOVING_TARGETS else None
    parts = ref.strip().split("/")
    if parts[-1] not in MOVING_TARGETS:
        return None
    shapes = (
        len(parts) <= 2,  # dev, origin/dev
        len(parts) == 3 and parts[:2] == ["refs", "heads"],
        len(parts) == 4 and parts[:2] == ["refs", "remotes"],
    )
    return parts[-1] if any(shapes) else None


def series_folder(ref: str, version: str) -> str:
    """The series folder a rebase onto ``ref`` writes: the moving target's own (``main`` for
    ``upstream-main``), else the release line of ``version`` (``core_v0.20``)."""
    return moving_target(ref) or line_dir_name(line_of(version))


def snapshot(target: str, commit: str) -> str:
    """What a moving target's series records as its release: ``dev@d48bd6be0a``, the commit
    it was made from."""
    return f"{target}@{commit[:10]}"


def parse_snapshot(release: str) -> Optional[Tuple[str, str]]:
    """``dev@d48bd6be0a`` -> ``("dev", "d48bd6be0a")``; a release version -> ``None``."""
    match = _SNAPSHOT_RE.match(release.strip())
    return (match.group(1), match.group(2)) if match else None


def line_order(names: List[str]) -> List[str]:
    """Series folder names in the order tools show them: release lines oldest first, then the
    moving targets in :data:`MOVING_TARGETS` order, then any other folder by name."""

    def key(name: str) -> Tuple[int, object]:
        line = parse_line(name)
        if line is not None:
            return (0, version_key(line))
        if name in MOVING_TARGETS:
            return (1, MOVING_TARGETS.index(name))
        return (2, name)

    return sorted(names, key=key)
