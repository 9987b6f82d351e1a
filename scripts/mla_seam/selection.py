"""Which release line's series serves a tree: by content first, then by version.

Upstream's own tags carry other version strings than PyPI (``0.19.1`` at ``core_v0.19.0``,
``0.17.0rc0`` at ``core_v0.17.0``, ``0.20.0`` on main), so the version string alone is not
trusted. The order, first match wins:

1. ``--series LINE``, when given;
2. the line recorded in the tree's state (``state.json``): status, revert and a repeated apply
   work on what was applied;
3. content: the touched files' blob ids (one ``git hash-object`` for all lines' files) against
   every line's manifest pre- and post-images and the post-images older mla-seam releases wrote
   (:mod:`mla_seam.earlier_versions`); an exact match picks that line whatever package_info says;
4. trial, when moving targets (``releases.MOVING_TARGETS``: main, dev) have series: of the
   version's line and the moving targets, the series whose every hunk applies strictly to the
   tree's files (the version's line first, then the moving target with the fewest hunks at an
   offset): a later commit of main or dev, or a fork of one, whose blobs no manifest records
   (:func:`by_trial`);
5. the release line of the version (``releases.line_of``: rc, dev, post and unlisted patch
   releases belong to their line), applied strictly (forks: see :mod:`mla_seam.forks`);
6. a version newer than the newest line is refused in one line naming ``--series``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from mla_seam import earlier_versions, gitlayer, paths, releases
from mla_seam.assess import TreeView, _converts
from mla_seam.errors import SeamError, UnsupportedVersionError, UsageError
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

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen series and why (``forced``, ``recorded``, ``content``, ``trial`` or
    ``version``)."""

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
    old = {name: earlier_versions.old_images(name) for name in earlier_versions.old_lines()}
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
    tried = by_trial(tree, root, own, blobs)
    if tried.selection is not None:
        return tried.selection
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
            + tried.refusal(newest)
        )
    # The classic message (lists what is supported), also for a listed release whose
    # line folder is missing.
    return Selection(find_series(tree.version, root), "version", "listed release", blobs)


# --- trial ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """What :func:`by_trial` found: per candidate series, the patches that do not apply
    strictly and the hunks at an offset, and the chosen series, if any."""

    failed: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    offsets: Dict[str, int] = dataclasses.field(default_factory=dict)
    sizes: Dict[str, int] = dataclasses.field(default_factory=dict)
    selection: Optional[Selection] = None

    def why(self, name: str) -> str:
        """``applies strictly (2 hunks at an offset)`` or ``2 of 8 patches do not apply (...)``."""
        failed = self.failed[name]
        if not failed:
            return f"applies strictly ({self.offsets[name]} hunk(s) at an offset)"
        verb = "does" if len(failed) == 1 else "do"
        return f"{len(failed)} of {self.sizes[name]} patches {verb} not apply ({', '.join(failed)})"

    def nearest(self, names: List[str]) -> Optional[str]:
        """Of ``names`` (tried), the one with the fewest patches that do not apply (first wins)."""
        tried = [n for n in names if n in self.failed]
        return min(tried, key=lambda n: len(self.failed[n])) if tried else None

    def refusal(self, newest: str) -> str:
        """What to try for a version no line serves, after the moving targets were tried."""
        moving = [n for n in self.failed if n in releases.MOVING_TARGETS]
        if not moving:
            return f"to try that one, pass --series {newest}"
        reasons = "; ".join(f"{name}: {self.why(name)}" for name in moving)
        return (
            f"no moving target's series applies strictly ({reasons}); to try the nearest, pass "
            f"--series {self.nearest(moving)} (--3way merges on a git checkout), or --series "
            f"{newest} for the newest release line"
        )


def _candidates(root: Path, own: str) -> List[str]:
    """The version's line (when it has a folder) and the moving targets that have a series."""
    names = [own] if (root / own).is_dir() else []
    return names + [n for n in releases.MOVING_TARGETS if (root / n / MANIFEST_NAME).is_file()]


def _committed_bytes(tree: MegatronTree, rels: List[str]) -> Dict[str, Optional[bytes]]:
    """The tree's files in their committed form (``None``: missing), as apply patches them."""
    present = [rel for rel in rels if (tree.root / rel).is_file()]
    view = TreeView(tree, _converts(tree, present, gitlayer.hash_blobs(tree.root, present)))
    return {rel: view.canonical(rel) if rel in present else None for rel in rels}


def _try(series: Series, tree: MegatronTree) -> Tuple[List[str], int]:
    """The patches of ``series`` that do not apply strictly to the tree's files, one after the
    other as apply runs them, and the hunks at an offset. On copies; the tree is only read."""
    sources = _committed_bytes(tree, series.touched)
    if any(data is None for data in sources.values()):
        return [p.name for p in series.patches], 0  # a file is missing: nothing applies
    with tempfile.TemporaryDirectory(prefix="mla-seam-trial-") as tmp:
        for rel, data in sources.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data or b"")
        results = series.apply_in(tmp, stop_on_error=False)
    return [r.name[:4] for r in results if not r.ok], sum(len(r.offsets) for r in results)


def by_trial(tree: MegatronTree, root: Path, own: str, blobs: Dict[str, Optional[str]]) -> Trial:
    """Choose by trying the series on the tree's files (step 4 of the module docstring).

    Candidates: the version's line ``own`` (when it has a folder) and the moving targets with a
    series; it runs only where there is a moving target. The version's line wins when it applies
    strictly (a fork of a release stays on its line). Else the moving target that applies
    strictly with the fewest hunks at an offset; else, where the version has a line, the
    candidate with the fewest patches that do not apply, when that is a moving target (apply
    then names the hunks and the commits that moved them, and ``--3way`` merges). The trial's
    ``selection`` is ``None`` when the version decides.
    """
    trial = Trial()
    names = _candidates(root, own)
    if not any(n in releases.MOVING_TARGETS for n in names):
        return trial
    loaded: Dict[str, Series] = {}
    for name in names:
        try:
            loaded[name] = load_series(root / name)
        except SeamError as err:
            if name == own:
                raise  # the version path reports a damaged line of the tree's own version
            log.debug("mla-seam: trial skips %s: %s", name, err.message)
            continue
        trial.sizes[name] = len(loaded[name].patches)
        trial.failed[name], trial.offsets[name] = _try(loaded[name], tree)
        if name == own and not trial.failed[name]:
            return trial  # the version's line applies: the version decides, as before
    fits = [n for n in loaded if n != own and not trial.failed[n]]
    if fits:
        chosen = min(fits, key=lambda n: trial.offsets[n])
        first = f"{chosen} {trial.why(chosen)}"
    else:
        chosen = trial.nearest(list(loaded)) if own in loaded else None
        if chosen is None or chosen == own:
            return trial
        first = f"{chosen} is the nearest: {trial.why(chosen)}"
    others = "".join(f"; {n}: {trial.why(n)}" for n in loaded if n != chosen)
    detail = f"{first}{others}; package_info says {tree.version}"
    trial.selection = Selection(loaded[chosen], "trial", detail, blobs)
    return trial
