"""Which release line's series serves a tree: by content first, then by version.

Upstream's own tags carry other version strings than PyPI (``0.19.1`` at ``core_v0.19.0``,
``0.17.0rc0`` at ``core_v0.17.0``, ``0.20.0`` on main), so the version string alone is not
trusted. The order, first match wins:

1. ``--series LINE``, when given;
2. the line recorded in the tree's state (``state.json``): status, revert and a repeated apply
   work on what was applied;
3. content: the touched files' blob ids (one ``git hash-object`` for all lines' files) against
   every line's manifest pre- and post-images and the post-images older mla-seam releases wrote
   (:mod:`mla_seam.released`); an exact match picks that line whatever package_info says;
4. the release line of the version (``releases.line_of``: rc, dev, post and unlisted patch
   releases belong to their line), applied strictly (forks: see :mod:`mla_seam.forks`);
5. a version newer than the newest line is refused in one line naming ``--series``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from mla_seam import gitlayer, paths, released, releases
from mla_seam.errors import UnsupportedVersionError, UsageError
from mla_seam.record import State
from mla_seam.series import (
    MANIFEST_NAME,
    Series,
    find_series,
    load_series,
    series_by_name,
    supported_lines,
)
from mla_seam.tree import MegatronTree


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen series and why (``forced``, ``recorded``, ``content`` or ``version``)."""

    series: Series
    how: str
    detail: str
    blobs: Dict[str, Optional[str]]  # touched file -> blob id, as hashed for the fingerprint

    def describe(self) -> str:
        """``core_v0.19 (selected by content: ...)`` for status lines."""
        how = {"forced": "forced with", "recorded": "as recorded in"}.get(self.how)
        if how:
            return f"{self.series.name} ({how} {self.detail})"
        return f"{self.series.name} (selected by {self.how}: {self.detail})"


@dataclasses.dataclass(frozen=True)
class _Line:
    name: str
    images: Dict[str, Set[str]]  # file -> blob ids that identify this line (pre, post, old post)
    pre: Dict[str, Set[str]]


def _read_lines(root: Path) -> List[_Line]:
    """Every line folder's images, read leniently (an unreadable manifest is skipped here and
    reported by the series loader if that line is chosen)."""
    result = []
    old = {name: released.old_images(name) for name in released.old_lines()}
    for line_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            files = json.loads((line_dir / MANIFEST_NAME).read_bytes())["files"]
            images = {
                rel: {b for i in imgs for b in (i["pre"], i["post"])} for rel, imgs in files.items()
            }
            pre = {rel: {i["pre"] for i in imgs} for rel, imgs in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for rel, imgs in old.get(line_dir.name, {}).items():
            if rel in images:
                images[rel].update(i.post for i in imgs)
        result.append(_Line(line_dir.name, images, pre))
    return result


def fingerprint(
    tree: MegatronTree, root: Optional[Path] = None
) -> Tuple[List[str], Dict[str, Optional[str]]]:
    """Lines whose every touched file matches one of their images exactly, and the blob ids."""
    root = root if root is not None else paths.patches_dir()
    lines = _read_lines(root)
    wanted = sorted({rel for line in lines for rel in line.images})
    blobs = gitlayer.hash_blobs(tree.root, wanted) if wanted else {}
    matches = [
        line.name
        for line in lines
        if line.images and all(blobs.get(rel) in imgs for rel, imgs in line.images.items())
    ]
    return matches, blobs


def _newest_line(root: Path) -> Optional[str]:
    names = [p.name for p in root.iterdir() if p.is_dir() and releases.parse_line(p.name)]
    return max(
        names, key=lambda n: releases.version_key(releases.parse_line(n) or ""), default=None
    )


def select_series(
    tree: MegatronTree,
    forced: Optional[str] = None,
    record: Optional[State] = None,
    root: Optional[Path] = None,
) -> Selection:
    """The series for ``tree`` (see the module docstring for the order).

    Raises:
        UsageError: ``--series`` is empty or names no line.
        UnsupportedVersionError: nothing matches and no line serves the version.
        SeriesCorruptError: the chosen line's folder is damaged.
    """
    root = Path(root) if root is not None else paths.patches_dir()
    if forced is not None:
        if not forced.strip():
            raise UsageError(
                "--series is empty (an unset shell variable?)",
                "pass a release line such as core_v0.19, or leave --series out",
            )
        return Selection(series_by_name(forced, root), "forced", f"--series {forced}", {})
    applied = record.applied if record is not None else None
    if applied is not None and record is not None:
        line = applied.line
        if not (root / line).is_dir():
            raise UnsupportedVersionError(
                f"the tree records {line} as applied (by {record.tool}), and this mla-seam has "
                f"no {line} series; supported: {supported_lines(root)}",
                "revert it with the mla-seam version that applied it, or pass --series LINE",
            )
        return Selection(load_series(root / line), "recorded", "the tree's state folder", {})
    matches, blobs = fingerprint(tree, root)
    if matches:
        own = releases.line_dir_name(releases.line_of(tree.version))
        chosen = own if own in matches else matches[-1]
        detail = "every touched file matches its recorded images"
        if chosen != own:
            detail += f" (package_info says {tree.version})"
        return Selection(load_series(root / chosen), "content", detail, blobs)
    own = releases.line_dir_name(releases.line_of(tree.version))
    if (root / own).is_dir():
        return Selection(
            load_series(root / own),
            "version",
            f"megatron-core {tree.version} is on its line",
            blobs,
        )
    newest = _newest_line(root)
    newest_version = releases.parse_line(newest) if newest else None
    if newest_version and releases.version_key(
        releases.line_of(tree.version)
    ) > releases.version_key(newest_version):
        raise UnsupportedVersionError(
            f"megatron-core {tree.version} is newer than every series (newest: {newest}); "
            f"to try that one, pass --series {newest}"
        )
    # The classic message (lists what is supported), also for a listed release whose
    # line folder is missing.
    return Selection(find_series(tree.version, root), "version", "listed release", blobs)
