"""What a Megatron tree holds, compared with a series: the read-only half of ``mla-seam apply``.

:func:`assess` hashes every touched file once and classifies it against three sources of
truth: the series' manifest (pre- and post-images of the releases it was made for), the tree's
state record (what an earlier run wrote: a fork's own pre- and post-images, the adapter it
replaced), and what earlier mla-seam releases wrote (:mod:`mla_seam.earlier_versions`). The
:class:`Applier` says who patched the tree, if anyone; the :attr:`Assessment.state` is one of
``applied``, ``not applied``, ``partial`` or ``drifted``.

Line endings: in a git work tree whose configuration converts files on checkout
(``core.autocrlf=true``, ``eol`` attributes, clean/smudge filters), files are compared and
patched in their committed form and written back in their checked-out form (:class:`TreeView`).
A file whose committed form has CRLF endings throughout is compared (and patched) as its LF
form (:func:`mla_seam.patching.to_patch_form`): a release file committed with CRLF is the
release, not a fork change.

A file that holds the series' result for some hooks while others are untouched, with no state
record, is a fork that picked those hooks by hand (in a git tree: when the change is committed);
it is then the fork's own content, and apply leaves those hunks out (``already in the fork``).
The same state as an uncommitted change in a git tree is a half-applied series.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mla_seam import earlier_versions, gitlayer, patching
from mla_seam.errors import (
    DirtyTreeError,
    DriftedTreeError,
    OverlayConflictError,
    ReadOnlyTreeError,
    SeamError,
    UnsafePathError,
)
from mla_seam.record import Applied, State
from mla_seam.series import Series
from mla_seam.statefolder import StateFolder
from mla_seam.tree import MegatronTree

PRE, POST, ORIGINAL, OTHER, MISSING = "pre", "post", "original", "other", "missing"
ABSENT, OURS, OLDER, FOREIGN = "absent", "ours", "older", "foreign"


@dataclasses.dataclass(frozen=True)
class Applier:
    """Who patched the tree: the state record, or the content (current or older series)."""

    source: str  # "record" | "content" | "released"
    tool: str  # "mla-seam 0.2.0"
    current: bool  # the current series and adapter, exactly
    method: str  # "exact" | "fork" | "3way"
    mode: str  # "worktree" | "commit"
    offsets: int
    files: Dict[str, Tuple[str, str]]  # rel -> (pre blob, post blob)
    overlay: Dict[str, str]  # rel -> the adapter blob written
    overlay_before: Optional[Dict[str, Optional[str]]]  # rel -> blob before (None: absent)
    record: Optional[Applied]


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """A touched tree file compared with the series and the applier."""

    rel: str
    blob: Optional[str]  # committed-form blob id of the file as it is (None: missing)
    kind: str  # pre | post | original | other | missing
    pristine: Optional[str]  # the blob this file has when nothing is applied, if known
    post: Optional[str]  # the manifest post-image a "pre" file becomes
    in_series: bool
    dirty: bool
    symlink: bool
    writable: bool
    crlf: bool = False  # committed with CRLF line endings throughout: patched as its LF form


@dataclasses.dataclass(frozen=True)
class OverlayCheck:
    """An overlay target in the tree compared with the series' overlay blob."""

    rel: str
    blob: Optional[str]
    expected: str
    kind: str  # absent | ours | older | foreign
    older: str  # the mla-seam version an "older" adapter came from ("" if not older)
    symlink: bool
    writable: bool
    tracked: bool  # committed in HEAD (git work trees)


class TreeView:
    """Reads and writes a tree's touched files in their committed form.

    Identity for plain folders and for git work trees without conversion; otherwise
    ``canonical`` applies the repository's clean side and ``checkout`` its smudge side.
    """

    def __init__(self, tree: MegatronTree, converts: bool) -> None:
        self.tree = tree
        self.converts = converts

    def raw(self, rel: str) -> bytes:
        return (self.tree.root / rel).read_bytes()

    def canonical(self, rel: str) -> bytes:
        """The committed form of the file's current bytes."""
        return self.canonical_of(rel, self.raw(rel))

    def canonical_of(self, rel: str, data: bytes) -> bytes:
        """The committed form of work-tree bytes ``data`` at ``rel``."""
        if not self.converts:
            return data
        blob = gitlayer.store_blob(self.tree.repo, data, rel)
        return gitlayer.blob_bytes(self.tree.repo, blob) or data

    def checkout(self, rel: str, data: bytes) -> bytes:
        """The work-tree form of committed-form ``data`` at ``rel``."""
        if not self.converts:
            return data
        blob = gitlayer.store_blob(self.tree.repo, data)
        return gitlayer.smudged(self.tree.repo, blob, rel)


@dataclasses.dataclass(frozen=True)
class Assessment:
    """Everything preflight learned about the tree, without writing anything."""

    tree: MegatronTree
    series: Series
    files: Tuple[FileCheck, ...]
    overlay: Tuple[OverlayCheck, ...]
    applier: Optional[Applier]
    record: Optional[State]
    pending: bool  # a journal of an interrupted run that could not be repaired (read-only)
    view: TreeView
    raw_blobs: Dict[str, Optional[str]]

    @property
    def symlinks(self) -> List[str]:
        return [c.rel for c in (*self.files, *self.overlay) if c.symlink]

    def applied_files(self) -> List[FileCheck]:
        """The files the applier patched (empty when nothing is applied)."""
        if self.applier is None:
            return []
        return [f for f in self.files if f.rel in self.applier.files]

    @property
    def state(self) -> str:
        """``applied``, ``not applied``, ``partial`` or ``drifted``."""
        if self.pending:
            return "partial"
        if self.symlinks or any(f.kind == MISSING for f in self.files):
            return "drifted"
        mine = self.applied_files()
        kinds = {f.kind for f in mine}
        if not mine or not kinds & {POST}:
            return "not applied"
        if OTHER in kinds:
            return "drifted"
        if kinds != {POST}:
            return "partial"
        overlay = {o.kind for o in self.overlay}
        if FOREIGN in overlay:
            return "drifted"
        return "partial" if ABSENT in overlay else "applied"

    @property
    def current(self) -> bool:
        """Applied, by exactly this series and adapter."""
        return (
            self.state == "applied"
            and self.applier is not None
            and self.applier.current
            and all(o.kind == OURS for o in self.overlay)
        )

    def headline(self) -> str:
        """The first line of ``--status``: the state, with what applied it."""
        state = self.state
        a = self.applier
        if state != "applied" or a is None:
            return state
        if not self.current:
            return f"applied by {a.tool} (an older series: `mla-seam apply` upgrades it)"
        if a.method in ("fork", "3way"):
            how = " by 3-way merge" if a.method == "3way" else ""
            return f"applied on a fork{how} ({a.offsets} offset{'s' if a.offsets != 1 else ''})"
        return "applied"

    @property
    def n_files(self) -> int:
        return len([f for f in self.files if f.in_series]) + len(self.overlay)

    def counts(self) -> str:
        """``3 patches, 4 files``."""
        n = len(self.series.patches)
        files = self.n_files
        return f"{n} patch{'es' if n != 1 else ''}, {files} file{'s' if files != 1 else ''}"


# --- building an assessment ----------------------------------------------------------------


def _symlinked(root: Path, rel: str) -> bool:
    """Whether ``rel`` or any folder on the way to it inside ``root`` is a symbolic link."""
    current = root
    for part in rel.split("/"):
        current = current / part
        if current.is_symlink():
            return True
    return False


def _writable(path: Path) -> bool:
    """Whether ``path`` can be replaced (its folder written) and, if it exists, written."""
    folder_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def find_applier(
    series: Series, state: Optional[State], blobs: Dict[str, Optional[str]]
) -> Optional[Applier]:
    """Who patched the tree: the state record first, else recognised post-images."""
    applied = state.applied if state is not None else None
    if applied is not None and state is not None:
        return Applier(
            source="record",
            tool=state.tool,
            current=applied.series_sha256 == series.sha256 and applied.overlay == series.overlay,
            method=applied.method,
            mode=applied.mode,
            offsets=applied.offsets,
            files=applied.pre_post(),
            overlay=dict(applied.overlay),
            overlay_before=applied.overlay_before,
            record=applied,
        )
    posts = {rel: {img.post: img.pre for img in imgs} for rel, imgs in series.files.items()}
    if any(blobs.get(rel) in table for rel, table in posts.items()):
        files = {}
        for rel, table in posts.items():
            blob = blobs.get(rel)
            pre = table.get(blob) if blob in table else series.files[rel][0].pre
            post = blob if blob in table else series.files[rel][0].post
            files[rel] = (pre, post)
        return Applier(
            "content", "this mla-seam", True, "exact", "worktree", 0, files,
            dict(series.overlay), None, None,
        )  # fmt: skip
    old = earlier_versions.old_images(series.name)
    for version in sorted({i.version for imgs in old.values() for i in imgs}, reverse=True):
        table = {rel: [i for i in imgs if i.version == version] for rel, imgs in old.items()}
        if any(blobs.get(rel) in {i.post for i in imgs} for rel, imgs in table.items()):
            files = {}
            for rel, imgs in table.items():
                match = [i for i in imgs if i.post == blobs.get(rel)] or imgs
                files[rel] = (match[0].pre, match[0].post)
            overlay = earlier_versions.releases()[version].get("overlay", {})
            return Applier(
                "released", f"mla-seam {version}", False, "exact", "worktree", 0, files,
                dict(overlay), None, None,
            )  # fmt: skip
    return None


def _converts(tree: MegatronTree, rels: Sequence[str], raw: Dict[str, Optional[str]]) -> bool:
    if not tree.is_git:
        return False
    filtered = gitlayer.filtered_blobs(tree.repo, [r for r in rels if raw.get(r)])
    return any(filtered[r] != raw[r] for r in filtered)


def assess(
    tree: MegatronTree,
    series: Series,
    folder: StateFolder,
    known_blobs: Optional[Dict[str, Optional[str]]] = None,
) -> Assessment:
    """Compare the tree with ``series`` (one hash-object and one git status for all files)."""
    record = folder.read_state()
    recorded = set(record.applied.files) if record is not None and record.applied else set()
    old = set(earlier_versions.old_images(series.name))
    wanted = sorted(set(series.touched) | recorded | old)
    overlay_rels = sorted(series.overlay)
    links = {rel for rel in wanted + overlay_rels if _symlinked(tree.root, rel)}
    hashable = [rel for rel in wanted + overlay_rels if rel not in links]
    if known_blobs is not None and all(rel in known_blobs for rel in hashable):
        raw = {rel: known_blobs[rel] for rel in hashable}
    else:
        raw = gitlayer.hash_blobs(tree.root, hashable)
    converts = _converts(tree, wanted, raw)
    blobs = dict(raw)
    if converts:
        blobs.update(gitlayer.filtered_blobs(tree.repo, [r for r in wanted if raw.get(r)]))
    view = TreeView(tree, converts)
    match, crlf = _line_endings(view, series, record, blobs)
    applier = find_applier(series, record, match)
    mine = set(applier.files) if applier else set()
    touched = sorted(set(series.touched) | mine)
    dirty = set(gitlayer.dirty_paths(tree.repo, touched)) if tree.is_git else set()
    pres = {rel: {img.pre: img.post for img in imgs} for rel, imgs in series.files.items()}
    files = []
    for rel in touched:
        kind, pristine, post = _classify(rel, blobs.get(rel), match.get(rel), pres.get(rel, {}),
                                         applier)  # fmt: skip
        files.append(
            FileCheck(
                rel, blobs.get(rel), kind, pristine, post, rel in series.files, rel in dirty,
                rel in links, _writable(tree.root / rel), rel in crlf,
            )  # fmt: skip
        )
    if _picked_by_hand(tree, applier, files):
        applier = None
        files = [
            dataclasses.replace(f, kind=OTHER, pristine=None) if f.kind == POST else f
            for f in files
        ]
    overlay = _overlay_checks(tree, series, applier, raw, links)
    pending = not folder.locked and folder.journal_path.exists()
    return Assessment(
        tree, series, tuple(files), tuple(overlay), applier, record, pending, view, raw,
    )  # fmt: skip


def _line_endings(
    view: TreeView, series: Series, state: Optional[State], blobs: Dict[str, Optional[str]]
) -> Tuple[Dict[str, Optional[str]], set]:
    """The blobs to compare with the manifests (a CRLF file's LF form) and the CRLF files.

    Only files that match no recorded image are read: the usual case costs nothing.
    """
    known = {b for imgs in series.files.values() for img in imgs for b in (img.pre, img.post)}
    if state is not None and state.applied is not None:
        known |= {b for img in state.applied.files.values() for b in (img.pre, img.post)}
    match = dict(blobs)
    crlf = set()
    for rel in series.touched:
        blob = blobs.get(rel)
        if blob is None or blob in known:
            continue
        data = view.canonical(rel)
        if patching.crlf(data):
            crlf.add(rel)
            match[rel] = gitlayer.blob_id(patching.to_patch_form(data, True))
    return match, crlf


def _picked_by_hand(tree: MegatronTree, applier: Optional[Applier], files: List[FileCheck]) -> bool:
    """Files equal to the series' result next to untouched ones, recognised by content only (no
    state record: mla-seam never leaves a half-applied tree without one), and in a git tree
    committed (no uncommitted change): hooks the fork picked by hand, not a half-applied run."""
    if applier is None or applier.source != "content":
        return False
    mine = [f for f in files if f.rel in applier.files and f.in_series]
    posts = [f for f in mine if f.kind == POST]
    return bool(posts) and len(posts) < len(mine) and not any(f.dirty for f in posts)


def _classify(
    rel: str,
    blob: Optional[str],
    match: Optional[str],
    pres: Dict[str, str],
    applier: Optional[Applier],
) -> Tuple[str, Optional[str], Optional[str]]:
    """``(kind, pristine blob, manifest post)`` of one touched file (``match``: the blob to
    compare with the manifest, a CRLF file's LF form)."""
    if blob is None:
        return MISSING, None, None
    mine = applier.files.get(rel) if applier else None
    got = blob if applier is not None and applier.source == "record" else match
    if mine and got == mine[1]:
        return POST, mine[0], None  # (pre == post: apply left it as it was, all in the fork)
    if match in pres:
        return PRE, blob, pres[match]
    if mine and got == mine[0]:
        return ORIGINAL, blob, None
    return OTHER, (mine[0] if mine else None), None


def _overlay_checks(
    tree: MegatronTree,
    series: Series,
    applier: Optional[Applier],
    raw: Dict[str, Optional[str]],
    links: set,
) -> List[OverlayCheck]:
    older = earlier_versions.old_overlays()
    checks = []
    for rel, expected in sorted(series.overlay.items()):
        blob, target = raw.get(rel), tree.root / rel
        absent = blob is None and rel not in links and not os.path.lexists(target)
        version = ""
        if absent:
            kind = ABSENT
        elif blob == expected:
            kind = OURS
        elif blob is not None and blob in older.get(rel, {}):
            kind, version = OLDER, older[rel][blob]
        elif blob is not None and applier is not None and applier.overlay.get(rel) == blob:
            kind, version = OLDER, applier.tool.removeprefix("mla-seam ")
        else:
            kind = FOREIGN
        tracked = bool(tree.is_git and not absent and gitlayer.head_blob(tree.repo, rel))
        checks.append(
            OverlayCheck(
                rel, blob, expected, kind, version, rel in links, _writable(target), tracked
            )
        )
    return checks


# --- problems ------------------------------------------------------------------------------


def _short(blob: Optional[str]) -> str:
    return blob[:12] if blob else "none"


def symlink_problem(a: Assessment) -> List[SeamError]:
    """A symbolic link on the way to a touched file."""
    if not a.symlinks:
        return []
    return [
        UnsafePathError(
            f"symbolic link on the path of {', '.join(a.symlinks)} in {a.tree.root}",
            "mla-seam writes regular files only: replace the link with the file it points to, "
            "or run mla-seam on the tree the link points into",
        )
    ]


def partial_problem(a: Assessment, verb: str) -> DriftedTreeError:
    """The series is half applied."""
    patched = [f.rel for f in a.applied_files() if f.kind == POST]
    pristine = [f.rel for f in a.applied_files() if f.kind in (PRE, ORIGINAL)]
    return DriftedTreeError(
        f"the series is half applied: patched {', '.join(patched)}; pristine "
        f"{', '.join(pristine)}; {verb} needs all of them in one state",
        "restore the patched files to the release (git checkout -- FILE in a checkout, or "
        "reinstall megatron-core), then run apply again",
    )


def edited_problem(a: Assessment, edited: Sequence[str]) -> DriftedTreeError:
    """Files changed after apply."""
    return DriftedTreeError(
        f"edited after apply (neither the patched nor the pristine content): "
        f"{', '.join(edited)}; reverting would lose those edits",
        "commit or copy your edits elsewhere and undo them (git diff / git stash in a "
        "checkout), so the files are as apply left them, then run --revert again",
    )


def read_only_problem(a: Assessment, blocked: Sequence[str]) -> ReadOnlyTreeError:
    """Files that cannot be written."""
    return ReadOnlyTreeError(
        f"cannot write {', '.join(blocked)} (or its folder) in {a.tree.root}",
        "make them writable for this user (chmod u+w, chown, or remount read-write), or run "
        "mla-seam as the tree's owner",
    )


def apply_problems(a: Assessment) -> List[SeamError]:
    """Why apply must refuse this tree before patching anything (empty: it may proceed).

    Files that are neither pre-image nor applied are not a problem here: they are a fork's,
    and the patches decide (:mod:`mla_seam.forks`).
    """
    problems = symlink_problem(a)
    dirty = [f.rel for f in a.files if f.dirty and f.kind != POST]
    if dirty:
        problems.append(
            DirtyTreeError(
                "uncommitted changes (staged or not) on files the series patches: "
                + ", ".join(dirty),
                "commit them or stash them (git stash), then run apply again; mla-seam never "
                "writes over uncommitted work",
            )
        )
    missing = [f.rel for f in a.files if f.kind == MISSING]
    if missing:
        from mla_seam.errors import PreimageMismatchError  # pylint: disable=import-outside-toplevel

        problems.append(
            PreimageMismatchError(
                f"{len(missing)} file(s) the series patches are missing: "
                + "; ".join(f"{rel} (missing)" for rel in missing),
                f"the tree is not a complete megatron-core {a.tree.version}: restore the files "
                "(git checkout -- FILE, or reinstall megatron-core)",
            )
        )
    for o in a.overlay:
        if o.kind == FOREIGN and not o.symlink:
            problems.append(
                OverlayConflictError(
                    f"{o.rel} already exists in {a.tree.root} and is not mla-seam's adapter "
                    f"(blob {_short(o.blob)}, ours {_short(o.expected)})",
                    "upstream or you added a file of that name: move it out of the way (keep a "
                    "copy if it is yours), then run apply again",
                )
            )
    mine = a.applied_files()
    kinds = {f.kind for f in mine}
    if POST in kinds and OTHER in kinds and not any(f.dirty for f in a.files if f.kind == OTHER):
        problems.append(edited_problem(a, [f.rel for f in mine if f.kind == OTHER]))
    elif POST in kinds and kinds & {PRE, ORIGINAL}:
        problems.append(partial_problem(a, "apply"))
    blocked = [f.rel for f in a.files if f.kind != POST and not f.writable and f.in_series]
    blocked += [o.rel for o in a.overlay if o.kind != OURS and not o.writable]
    if blocked and not a.current:
        problems.append(read_only_problem(a, blocked))
    return problems


def revert_problems(a: Assessment) -> List[SeamError]:
    """Why revert must refuse this tree (empty: it may proceed)."""
    problems = symlink_problem(a)
    edited = [f.rel for f in a.applied_files() if f.kind in (OTHER, MISSING)]
    edited += [o.rel for o in a.overlay if o.kind == FOREIGN and not o.symlink]
    if edited:
        problems.append(edited_problem(a, edited))
    kinds = {f.kind for f in a.applied_files()}
    if POST in kinds and kinds & {PRE, ORIGINAL}:
        problems.append(partial_problem(a, "revert"))
    blocked = [f.rel for f in a.files if f.kind == POST and not f.writable]
    blocked += [o.rel for o in a.overlay if o.kind in (OURS, OLDER) and not o.writable]
    if blocked:
        problems.append(read_only_problem(a, blocked))
    return problems
