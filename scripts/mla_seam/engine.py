"""Plans of ``mla-seam apply``: the exact bytes each touched file gets, and the state record.

A plan is computed from an :class:`~mla_seam.assess.Assessment` entirely outside the tree (temp
folders), so ``--check`` computes the very plan ``apply`` would commit and stops there. Apply
commits it in one journaled transaction (:meth:`mla_seam.statefolder.StateFolder.commit`) or, in
commit mode, as commits (:mod:`mla_seam.commitmode`) inside that transaction.

* apply on a release: the patches on the recorded pre-images; the result must be the
  manifest's post-images (anything else means a damaged series);
* apply on a fork: patch by patch (:mod:`mla_seam.patching`): strictly (offsets reported, no
  fuzz), past hunks the fork already holds, or merged 3-way with ``--3way``; a strict result
  must reverse to the fork's bytes; a refusal names the fork's commits that changed a hunk's
  context (:mod:`mla_seam.forks`);
* upgrade (a tree applied by an older series or mla-seam): back to the pristine bytes first,
  then as above, in the same transaction;
* revert: every patched file back to the bytes it had before apply, the adapter removed (or
  put back as it was: a user's own copy is never deleted).

Every plan keeps the pristine bytes of the files it changes in the state folder's ``objects/``
(named by blob id). Whatever a plan restores is verified first: a stored copy whose bytes are not
its blob id is refused (:class:`~mla_seam.errors.IntegrityError`), never written.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from mla_seam import forks, gitlayer, patching, paths, preimages
from mla_seam.assess import (
    ABSENT,
    OLDER,
    ORIGINAL,
    OTHER,
    OURS,
    POST,
    PRE,
    Assessment,
)
from mla_seam.errors import (
    IntegrityError,
    PatchFailedError,
    PreimageMismatchError,
    SeriesCorruptError,
    StateCorruptError,
)
from mla_seam.record import Applied, FileImages, InFork
from mla_seam.series import Series
from mla_seam.statefolder import StateFolder
from mla_seam.tree import Change


@dataclasses.dataclass
class Plan:
    """What a run will write: the changes, the state record and the pristine objects."""

    changes: List[Change]
    applied: Optional[Applied]
    objects: Dict[str, bytes]
    steps: List[patching.Step]
    method: str
    upgrade_from: str = ""
    kept: List[str] = dataclasses.field(default_factory=list)  # files revert leaves in place
    stages: List[Dict[str, bytes]] = dataclasses.field(default_factory=list)  # committed form

    @property
    def offsets(self) -> List[object]:
        return [o for s in self.steps for o in s.offsets]

    @property
    def in_fork(self) -> List[InFork]:
        return [h for s in self.steps for h in s.in_fork]

    @property
    def merged(self) -> List[str]:
        return [s.patch.name for s in self.steps if s.how == "3way"]


def blobs_of(files: Dict[str, bytes]) -> Dict[str, str]:
    """Git blob ids of in-memory file contents."""
    return {rel: gitlayer.blob_id(data) for rel, data in files.items()}


def overlay_bytes(series: Series) -> Dict[str, bytes]:
    """The overlay files' bytes, checked against the manifest's blob ids."""
    root = paths.overlay_dir()
    missing = [rel for rel in series.overlay if not (root / rel).is_file()]
    data = {rel: (root / rel).read_bytes() for rel in sorted(series.overlay) if rel not in missing}
    wrong = [
        rel for rel, blob in series.overlay.items() if rel in data and blob_of(data[rel]) != blob
    ]
    if missing or wrong:
        raise SeriesCorruptError(
            f"overlay/{', overlay/'.join(missing or wrong)} "
            f"{'is missing' if missing else 'does not match'} the blob in "
            f"{series.name}/manifest.json",
            "the adapter and the series were updated separately: re-export the series with "
            "`mla-seam rebase --write`, or restore overlay/ from the mla-seam repository",
        )
    return data


blob_of = gitlayer.blob_id


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


def _damaged_copy(a: Assessment, rel: str, blob: str, where: str, got: str) -> IntegrityError:
    if a.tree.is_git:
        commit = gitlayer.last_commit_with_blob(a.tree.repo, rel, blob)
        by_hand = (
            f"git checkout {commit[:12]} -- {rel} (that commit has the blob)"
            if commit
            else f"`git log --all --find-object={blob[:12]}` names a commit that has it: "
            f"git checkout COMMIT -- {rel}"
        )
    else:
        by_hand = f"copy {rel} from megatron-core {a.tree.version} (reinstall it) or your backup"
    return IntegrityError(
        f"the pristine copy of {rel} ({where}) fails verification: its bytes are blob "
        f"{_short(got)}, not the recorded {_short(blob)} (changed after apply); nothing was "
        "written",
        f"delete the damaged copy (rm {where}) and run the command again: mla-seam then rebuilds "
        f"{rel} from the series run backwards, git's objects or the release's sdist, "
        f"checked against the same blob id; or restore it by hand: {by_hand}",
    )


def _verified(a: Assessment, rel: str, blob: str, data: bytes) -> bool:
    """Whether work-tree bytes ``data`` of ``rel`` are the committed-form blob ``blob``."""
    if blob_of(data) == blob:
        return True
    return a.view.converts and blob_of(a.view.canonical_of(rel, data)) == blob


def restore_pristine(a: Assessment, folder: StateFolder, need: Dict[str, str]) -> Dict[str, bytes]:
    """Work-tree bytes of each file in ``need`` (``rel -> pristine blob``), every one verified
    against its blob id: the state folder's store, the series run backwards, the tree's git
    objects, a cached release checkout, or the release's sdist (:mod:`mla_seam.preimages`).

    Raises:
        IntegrityError: a stored copy is not its blob (nothing falls back silently).
        PreimageUnavailableError: release files no source has (the hint says how to get them).
        StateCorruptError: no source has a file's pristine bytes (a fork's own bytes).
    """
    found: Dict[str, bytes] = {}
    for rel, blob in need.items():
        data = folder.load_object(blob)
        if data is None:
            continue
        if not _verified(a, rel, blob, data):
            raise _damaged_copy(a, rel, blob, str(folder.object_path(blob)), blob_of(data))
        found[rel] = data
    left = {rel: blob for rel, blob in need.items() if rel not in found}
    canonical: Dict[str, bytes] = {}
    if left and a.applier is not None and a.applier.current:
        sources = {rel: a.view.canonical(rel) for rel in a.series.touched}
        canonical.update(forks.reverse_series(a.series, sources, left))
    left = {rel: blob for rel, blob in left.items() if rel not in canonical}
    problems: List[str] = []
    if left:
        repos = ([a.tree.repo] if a.tree.is_git else []) + forks.cached_release_repos()
        by_blob, problems = preimages.obtain(a.series, left.values(), repos, download=True)
        canonical.update({rel: by_blob[blob] for rel, blob in left.items() if blob in by_blob})
    left = {rel: blob for rel, blob in left.items() if rel not in canonical}
    pres = {img.pre for imgs in a.series.files.values() for img in imgs}
    if left and set(left.values()) <= pres:
        raise preimages.unavailable(a.series, left, "rebuilding the files as they were", problems)
    if left:
        raise StateCorruptError(
            "cannot find the bytes these files had before mla-seam patched them: "
            + "; ".join(f"{rel} (blob {_short(blob)})" for rel, blob in sorted(left.items())),
            "restore the files from your own copy (`git checkout COMMIT -- FILE` with the commit "
            "that has them)",
        )
    found.update({rel: a.view.checkout(rel, data) for rel, data in canonical.items()})
    return found


# --- apply ---------------------------------------------------------------------------------


def _crlf(a: Assessment) -> Dict[str, bool]:
    return {f.rel: f.crlf for f in a.files}


def _patch(
    a: Assessment, sources: Dict[str, bytes], three_way: bool, stages: bool
) -> Tuple[Dict[str, bytes], List[patching.Step], str]:
    """The series on patch-form ``sources``: new bytes (patch form), the steps, the method."""
    series = a.series
    repos = forks.cached_release_repos() if three_way else []
    steps = patching.run(series, sources, three_way, a.tree.repo, repos, stages)
    failed = [s for s in steps if not s.ok]
    if failed:
        raise _refusal(a, sources, steps, three_way)
    new = patching.final(sources, steps)
    if any(s.how == "3way" for s in steps):
        return new, steps, "3way"
    pres = blobs_of(sources)
    exact = all(s.how in ("exact", "offset") for s in steps) and all(
        any(img.pre == pres[rel] for img in series.files[rel]) for rel in series.touched
    )
    if exact:
        want = {
            rel: next(img.post for img in series.files[rel] if img.pre == pres[rel])
            for rel in series.touched
        }
        check_posts(series, blobs_of(new), want)
        return new, steps, "exact"
    if not patching.reverses(steps, new, sources):
        raise PatchFailedError(
            f"{series.name} applies to this fork but does not reverse to its bytes: refusing a "
            "change that --revert could not undo",
            "report this with the fork's file; meanwhile port the hook by hand",
        )
    return new, steps, "fork"


def _refusal(
    a: Assessment, sources: Dict[str, bytes], steps: List[patching.Step], three_way: bool
) -> PreimageMismatchError:
    failed = [s for s in steps if not s.ok]
    if three_way:
        return PreimageMismatchError(
            f"the 3-way merge of {a.series.name} has conflicts ("
            + "; ".join(f"{s.patch.name}: {s.report or 'no merge base'}" for s in failed)
            + "); it was rolled back: the tree is unchanged",
            "port the hook by hand on the fork (the patches are in the series folder)",
        )
    pres = {rel: a.series.files[rel][0].pre for rel in a.series.touched}
    repos = ([a.tree.repo] if a.tree.is_git else []) + forks.cached_release_repos()
    found, _ = preimages.obtain(a.series, pres.values(), repos, download=False)  # cached only
    release = {rel: found.get(blob) for rel, blob in pres.items()}
    conflicts = [c for s in failed for c in s.conflicts]
    return forks.conflict_error(
        a.series, conflicts, sources, a.tree.repo if a.tree.is_git else None, release
    )


def _pristine_committed(a: Assessment, pristine_raw: Dict[str, bytes]) -> Dict[str, bytes]:
    """Committed-form pristine bytes of every touched file that has them."""
    result: Dict[str, bytes] = {}
    for f in a.files:
        if f.kind in (PRE, ORIGINAL, OTHER):
            result[f.rel] = a.view.canonical(f.rel)
        elif f.rel in pristine_raw:
            result[f.rel] = a.view.canonical_of(f.rel, pristine_raw[f.rel])
    return result


def apply_plan(a: Assessment, folder: StateFolder, three_way: bool, mode: str) -> Plan:
    """The plan that leaves the tree applied with the current series (fresh or upgrade)."""
    series = a.series
    upgrading = a.applier is not None and a.state in ("applied", "partial") and not a.current
    need = {f.rel: f.pristine for f in a.files if f.kind == POST and f.pristine}
    pristine_raw = restore_pristine(a, folder, need) if need else {}
    for f in a.files:
        if f.kind in (PRE, ORIGINAL, OTHER):
            pristine_raw[f.rel] = a.view.raw(f.rel)
    pristine_c = _pristine_committed(a, pristine_raw)
    crlf = _crlf(a)
    if a.applier is not None and a.applier.current and a.state == "partial":
        new_c = {f.rel: a.view.canonical(f.rel) for f in a.files if f.in_series}
        steps: List[patching.Step] = []
        method = a.applier.method
        stages: List[Dict[str, bytes]] = []
    else:
        sources = {
            rel: patching.to_patch_form(pristine_c[rel], crlf[rel]) for rel in series.touched
        }
        new_p, steps, method = _patch(a, sources, three_way, stages=mode == "commit")
        new_c = {rel: patching.from_patch_form(data, crlf[rel]) for rel, data in new_p.items()}
        stages = [
            {rel: patching.from_patch_form(d, crlf[rel]) for rel, d in s.files.items()}
            for s in steps
        ]
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
    pre_blobs = blobs_of({rel: pristine_c[rel] for rel in series.touched})
    post_blobs = blobs_of({rel: new_c[rel] for rel in series.touched})
    for rel in series.touched:
        stored[pre_blobs[rel]] = pristine_raw[rel]
    applied = Applied(
        line=series.name,
        release=a.tree.version,
        series_sha256=series.sha256,
        files={rel: FileImages(pre_blobs[rel], post_blobs[rel]) for rel in series.touched},
        overlay=dict(series.overlay),
        method=method,
        mode=mode,
        offsets=sum(len(s.offsets) for s in steps),
        overlay_before=before,
        in_fork=[h for s in steps for h in s.in_fork],
        merged=[s.patch.name for s in steps if s.how == "3way"],
    )
    return Plan(
        changes,
        applied,
        stored,
        steps,
        method,
        upgrade_from=a.applier.tool if upgrading and a.applier else "",
        stages=stages,
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
                if blob_of(data) != old:
                    raise _damaged_copy(a, o.rel, old, str(folder.object_path(old)), blob_of(data))
                changes.append(Change(o.rel, o.blob, data, old))
            else:
                kept.append(o.rel)
        elif o.tracked:
            kept.append(o.rel)  # committed in HEAD: the user's copy, never deleted
        else:
            changes.append(Change(o.rel, o.blob, None, None))
    return Plan(changes, None, {}, [], "revert", kept=kept)


def step_lines(plan: Plan) -> List[str]:
    """What each patch did (or would do), for ``--check`` and ``-v``."""
    return [line for step in plan.steps for line in step.describe()]
