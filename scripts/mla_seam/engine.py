"""Plans of ``mla-seam apply``: the exact bytes each touched file gets, and the state record.

A plan is computed from an :class:`~mla_seam.assess.Assessment` entirely outside the tree
(scratch folders inside the state folder), then committed in one journaled transaction
(:meth:`mla_seam.tree.StateFolder.commit`) or, in commit mode, as commits
(:mod:`mla_seam.commitmode`).

* apply on a release: the patches on the recorded pre-images; the result must be the
  manifest's post-images (anything else means a damaged series);
* apply on a fork: the patches strictly on the fork's bytes (offsets reported, no fuzz), and
  the result must reverse to those bytes; a hunk that does not apply is refused with the fork's
  commits that changed its context (:mod:`mla_seam.forks`), or merged with ``--3way``;
* upgrade (a tree applied by an older series or mla-seam): back to the pristine bytes first,
  then as above, in the same transaction;
* revert: every patched file back to the bytes it had before apply, the adapter removed (or
  put back as it was: a user's own copy is never deleted).

Every plan keeps the pristine bytes of the files it changes in the state folder's
``objects/`` (named by blob id), so a revert never depends on the patches still reversing.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mla_seam import forks, gitlayer, paths
from mla_seam.assess import (
    ABSENT,
    MISSING,
    OLDER,
    ORIGINAL,
    OTHER,
    OURS,
    POST,
    PRE,
    Assessment,
)
from mla_seam.errors import (
    PatchFailedError,
    PreimageMismatchError,
    SeriesCorruptError,
    StateCorruptError,
)
from mla_seam.series import PatchResult, Series
from mla_seam.tree import Change, StateFolder


@dataclasses.dataclass
class Plan:
    """What a run will write: the changes, the state record and the pristine objects."""

    changes: List[Change]
    record: dict
    objects: Dict[str, bytes]
    results: List[PatchResult]
    method: str
    upgrade_from: str = ""
    kept: List[str] = dataclasses.field(default_factory=list)  # files revert leaves in place

    @property
    def offsets(self) -> List[object]:
        return [o for r in self.results for o in r.offsets]


def blobs_of(files: Dict[str, bytes]) -> Dict[str, str]:
    """Git blob ids of in-memory file contents (one hash-object for all)."""
    with tempfile.TemporaryDirectory(prefix="mla-seam-blobs-") as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        return {rel: blob for rel, blob in gitlayer.hash_blobs(tmp, sorted(files)).items() if blob}


def overlay_bytes(series: Series) -> Dict[str, bytes]:
    """The overlay files' bytes, checked against the manifest's blob ids."""
    root = paths.overlay_dir()
    missing = [rel for rel in series.overlay if not (root / rel).is_file()]
    blobs = gitlayer.hash_blobs(root, sorted(series.overlay))
    wrong = [rel for rel, blob in series.overlay.items() if blobs[rel] != blob]
    if missing or wrong:
        raise SeriesCorruptError(
            f"overlay/{', overlay/'.join(missing or wrong)} "
            f"{'is missing' if missing else 'does not match'} the blob in "
            f"{series.name}/manifest.json",
            "the adapter and the series were updated separately: re-export the series with "
            "`mla-seam rebase --write`, or restore overlay/ from the mla-seam repository",
        )
    return {rel: (root / rel).read_bytes() for rel in sorted(series.overlay)}


def run_series(
    series: Series, sources: Dict[str, bytes], scratch: Path, reverse: bool = False
) -> Tuple[Dict[str, bytes], List[PatchResult]]:
    """Patch copies of ``sources`` in ``scratch`` (each patch all or nothing, none stops)."""
    for rel, data in sources.items():
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    results = series.apply_in(scratch, reverse=reverse, stop_on_error=False)
    return {rel: (scratch / rel).read_bytes() for rel in sorted(sources)}, results


def _short(blob: Optional[str]) -> str:
    return blob[:12] if blob else "none"


def check_posts(series: Series, got: Dict[str, str], want: Dict[str, str]) -> None:
    """The patched result of a release must be the manifest's post-images."""
    bad = [rel for rel in sorted(want) if got.get(rel) != want[rel]]
    if bad:
        detail = "; ".join(f"{rel}: {_short(got.get(rel))} != {_short(want[rel])}" for rel in bad)
        raise SeriesCorruptError(
            f"{series.name}: the patched result does not match the manifest ({detail})",
            "the patches and manifest.json disagree: re-export the series with "
            "`mla-seam rebase --write`; the tree was not changed",
        )


# --- pristine bytes ------------------------------------------------------------------------


def restore_pristine(a: Assessment, folder: StateFolder, need: Dict[str, str]) -> Dict[str, bytes]:
    """Work-tree bytes of each file in ``need`` (``rel -> pristine blob``), from the state
    folder's store, the series run backwards, the tree's git objects or a cached release.

    Raises:
        StateCorruptError: no source has a file's pristine bytes.
    """
    found: Dict[str, bytes] = {}
    for rel, blob in need.items():
        data = folder.load_object(blob)
        if data is not None:
            found[rel] = data
    left = {rel: blob for rel, blob in need.items() if rel not in found}
    canonical: Dict[str, bytes] = {}
    if left and a.applier is not None and a.applier.current:
        sources = {rel: a.view.canonical(rel) for rel in a.series.touched}
        canonical.update(forks.reverse_series(a.series, sources, left))
    left = {rel: blob for rel, blob in left.items() if rel not in canonical}
    if left and a.tree.is_git:
        canonical.update(forks.from_objects([a.tree.repo], left))
    left = {rel: blob for rel, blob in left.items() if rel not in canonical}
    if left:
        canonical.update(forks.from_objects(forks.cached_release_repos(), left))
    left = {rel: blob for rel, blob in left.items() if rel not in canonical}
    if left:
        raise StateCorruptError(
            "cannot find the bytes these files had before mla-seam patched them: "
            + "; ".join(f"{rel} (blob {_short(blob)})" for rel, blob in sorted(left.items())),
            f"cache the release they came from (`mla-seam upstream get {a.tree.version}`) and run "
            "again, or restore the files from your own copy of the release",
        )
    found.update({rel: a.view.checkout(rel, data) for rel, data in canonical.items()})
    return found


# --- apply ---------------------------------------------------------------------------------


def _patch(
    a: Assessment, folder: StateFolder, sources: Dict[str, bytes], three_way: bool
) -> Tuple[Dict[str, bytes], List[PatchResult], str]:
    """The series on committed-form ``sources``: new bytes, per-patch results, method."""
    series = a.series
    exact = all(f.kind in (PRE, POST) for f in a.files if f.in_series)
    with folder.scratch() as scratch:
        new, results = run_series(series, sources, scratch)
    if all(r.ok for r in results):
        if exact:
            pres = blobs_of(sources)
            want = {
                rel: next(img.post for img in series.files[rel] if img.pre == pres[rel])
                for rel in series.touched
                if any(img.pre == pres.get(rel) for img in series.files[rel])
            }
            check_posts(series, blobs_of(new), want)
            return new, results, "exact"
        back = forks.reverse_series(series, new, blobs_of(sources))
        if set(back) != set(sources):
            raise PatchFailedError(
                f"{series.name} applies to this fork but does not reverse to its bytes "
                f"({', '.join(sorted(set(sources) - set(back)))}): refusing a change that "
                "--revert could not undo",
                "report this with the fork's file; meanwhile port the hook by hand",
            )
        return new, results, "fork"
    with folder.scratch() as scratch:
        conflicts = forks.failing_hunks(series, sources, scratch)
    if three_way:
        if not a.tree.is_git:
            raise PreimageMismatchError(
                f"--3way needs a git checkout holding the release's blobs; {a.tree.root} is a "
                "plain folder",
                "apply on a git checkout of the fork, or port the hook by hand",
            )
        with folder.scratch() as scratch:
            merged, report = forks.three_way(a.tree.repo, series.patches, sources, scratch)
        if merged is not None:
            return merged, [PatchResult(p.name, True) for p in series.patches], "3way"
        raise PreimageMismatchError(
            f"the 3-way merge of {series.name} has conflicts ({report}); it was rolled back: "
            "the tree is unchanged",
            "port the hook by hand on the fork (the patches are in the series folder)",
        )
    pres = {rel: series.files[rel][0].pre for rel in series.touched}
    repos = [a.tree.repo] if a.tree.is_git else []
    release = forks.from_objects(repos, pres)
    missing = {rel: b for rel, b in pres.items() if rel not in release}
    if missing:
        release.update(forks.from_objects(forks.cached_release_repos(), missing))
    raise forks.conflict_error(
        series, conflicts, sources, a.tree.repo if a.tree.is_git else None, dict(release)
    )


def apply_plan(a: Assessment, folder: StateFolder, three_way: bool, mode: str) -> Plan:
    """The plan that leaves the tree applied with the current series (fresh or upgrade)."""
    series = a.series
    upgrading = a.applier is not None and a.state in ("applied", "partial") and not a.current
    need = {f.rel: f.pristine for f in a.files if f.kind == POST and f.pristine}
    pristine_raw = restore_pristine(a, folder, need) if need else {}
    current_raw = {f.rel: a.view.raw(f.rel) for f in a.files if f.kind != MISSING}
    pristine_c: Dict[str, bytes] = {}
    for f in a.files:
        if f.kind in (PRE, ORIGINAL, OTHER):
            pristine_c[f.rel] = a.view.canonical(f.rel)
            pristine_raw[f.rel] = current_raw[f.rel]
        elif f.rel in pristine_raw:
            pristine_c[f.rel] = (
                pristine_raw[f.rel]
                if not a.view.converts
                else gitlayer.blob_bytes(a.tree.repo, f.pristine) or pristine_raw[f.rel]
            )
    sources = {rel: pristine_c[rel] for rel in series.touched}
    if a.applier is not None and a.applier.current and a.state == "partial":
        new_c, results, method = (
            {f.rel: a.view.canonical(f.rel) for f in a.files if f.in_series},
            [],
            a.applier.method,
        )
    else:
        new_c, results, method = _patch(a, folder, sources, three_way)
    new_raw = {rel: a.view.checkout(rel, data) for rel, data in new_c.items()}
    for f in a.files:  # files only an older series touched go back to their pristine bytes
        if not f.in_series and f.kind == POST:
            new_raw[f.rel] = pristine_raw[f.rel]
    raw_blobs = blobs_of(new_raw)
    changes = [
        Change(rel, a.raw_blobs.get(rel), new_raw[rel], raw_blobs[rel])
        for rel in sorted(new_raw)
        if raw_blobs[rel] != a.raw_blobs.get(rel)
    ]
    overlay = overlay_bytes(series)
    before = dict(a.applier.overlay_before or {}) if upgrading and a.applier else {}
    objects = {}
    for o in a.overlay:
        if o.kind != OURS:
            changes.append(Change(o.rel, o.blob, overlay[o.rel], o.expected))
        if not upgrading:
            before[o.rel] = None if o.kind == ABSENT else o.blob
            if o.kind != ABSENT and o.blob:
                objects[o.rel] = o.blob
        elif a.applier is not None and a.applier.overlay_before is None and not o.tracked:
            before[o.rel] = None
    stored = {blob: a.view.raw(rel) for rel, blob in objects.items()}
    pre_blobs = blobs_of(pristine_c)
    post_blobs = blobs_of(new_c)
    for rel in series.touched:
        stored[pre_blobs[rel]] = pristine_raw[rel]
    offsets = [o for r in results for o in r.offsets]
    record = {
        "applied": {
            "line": series.name,
            "release": a.tree.version,
            "series_sha256": series.sha256,
            "method": method,
            "mode": mode,
            "offsets": len(offsets),
            "files": {
                rel: {"pre": pre_blobs[rel], "post": post_blobs[rel]} for rel in series.touched
            },
            "overlay": dict(series.overlay),
            "overlay_before": before,
        }
    }
    return Plan(
        changes,
        record,
        stored,
        results,
        method,
        upgrade_from=a.applier.tool if upgrading and a.applier else "",
    )


# --- revert --------------------------------------------------------------------------------


def revert_plan(a: Assessment, folder: StateFolder) -> Plan:
    """The plan that gives every patched file its pre-apply bytes and removes the adapter."""
    need = {f.rel: f.pristine for f in a.applied_files() if f.kind == POST and f.pristine}
    restored = restore_pristine(a, folder, need) if need else {}
    blobs = blobs_of(restored)
    changes = [
        Change(rel, a.raw_blobs.get(rel), data, blobs[rel])
        for rel, data in sorted(restored.items())
        if blobs[rel] != a.raw_blobs.get(rel)
    ]
    kept: List[str] = []
    before = (a.applier.overlay_before if a.applier else None) or {}
    for o in a.overlay:
        if o.kind not in (OURS, OLDER):
            continue
        if o.rel in before:
            old = before[o.rel]
            if old is None:
                changes.append(Change(o.rel, o.blob, None, None))
            elif old != o.blob:
                data = folder.load_object(old)
                if data is None:
                    kept.append(o.rel)
                    continue
                changes.append(Change(o.rel, o.blob, data, old))
            else:
                kept.append(o.rel)
        elif o.tracked:
            kept.append(o.rel)  # committed in HEAD: the user's copy, never deleted
        else:
            changes.append(Change(o.rel, o.blob, None, None))
    return Plan(changes, {"applied": None}, {}, [], "revert", kept=kept)


def simulate(a: Assessment) -> Tuple[List[str], List[Exception]]:
    """What the patches do on scratch copies of the tree's files (for ``--check``)."""
    if any(f.kind == POST for f in a.files):
        return ["  patches: not simulated (files already patched)"], []
    sources = {f.rel: a.view.canonical(f.rel) for f in a.files if f.in_series and f.kind != MISSING}
    if len(sources) != len(a.series.touched):
        return ["  patches: not simulated (files missing)"], []
    with tempfile.TemporaryDirectory(prefix="mla-seam-check-") as tmp:
        new, results = run_series(a.series, sources, Path(tmp))
    lines: List[str] = []
    for r in results:
        state = (
            "fails: " + r.error
            if not r.ok
            else "applies with offsets" if r.offsets else "applies exactly"
        )
        lines.append(f"  patch {r.name}: {state}")
        lines += [f"    offset: {o}" for o in r.offsets]
    problems: List[Exception] = []
    if not all(r.ok for r in results):
        with tempfile.TemporaryDirectory(prefix="mla-seam-check-") as tmp:
            conflicts = forks.failing_hunks(a.series, sources, Path(tmp))
        pres = {rel: a.series.files[rel][0].pre for rel in a.series.touched}
        release = forks.from_objects([a.tree.repo] if a.tree.is_git else [], pres)
        problems.append(
            forks.conflict_error(
                a.series, conflicts, sources, a.tree.repo if a.tree.is_git else None, release
            )
        )
    elif all(f.kind == PRE for f in a.files if f.in_series):
        pres = blobs_of(sources)
        want = {
            rel: next(img.post for img in a.series.files[rel] if img.pre == pres[rel])
            for rel in a.series.touched
        }
        try:
            check_posts(a.series, blobs_of(new), want)
        except SeriesCorruptError as exc:
            problems.append(exc)
    return lines, problems
