"""The ``apply`` verb: put the MLA adapter and its hook series into a Megatron tree, atomically.

``mla-seam apply [--check | --status | --revert] [--series LINE] [MEGATRON_DIR]``

Working-tree mode, on git checkouts too: apply writes files and never commits, so git work trees
and plain folders (site-packages, an sdist) go through the same code path, the user's history
is never rewritten, and the user commits the change when they want. What is applied is recorded
in the tree's state folder (see :mod:`mla_seam.tree`), which makes ``--status`` and ``--revert``
work where git cannot help.

A run goes: lock the state folder -> recover an interrupted earlier run -> preflight (tree,
version, series, overlay, symlinks, pre-image blob ids, uncommitted changes, writability) ->
post-images built in a scratch folder and checked against the manifest -> one journaled commit
(:meth:`mla_seam.tree.StateFolder.commit`) that survives SIGKILL at any point. Patches apply
strictly (no fuzz); offsets are reported. Applying twice changes nothing.

With no MEGATRON_DIR, apply runs the embedded default job: materialize megatron-core
:data:`DEFAULT_RELEASE` into ``./megatron-lm`` (or reuse it), apply, and print the adapter's
summary (:func:`adapter_summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from mla_seam import gitlayer, paths
from mla_seam.errors import (
    DirtyTreeError,
    DriftedTreeError,
    InterruptedRunError,
    OverlayConflictError,
    PatchFailedError,
    PreimageMismatchError,
    ReadOnlyTreeError,
    SeamError,
    SeriesCorruptError,
    UnsafePathError,
    UpstreamError,
    UsageError,
)
from mla_seam.series import FileImage, PatchResult, Series, find_series, series_by_name
from mla_seam.tree import Change, MegatronTree, StateFolder, crash_point

log = logging.getLogger(__name__)

DEFAULT_RELEASE = "0.19.2"
DEFAULT_CHECKOUT = "megatron-lm"  # relative to the current directory
PYTHON_ENV = "MLA_SEAM_PYTHON"  # interpreter for adapter_summary (default: one with torch)


def _emit(text: str) -> None:
    """The one place result lines are written to stdout."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


# --- assessment ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """A touched tree file compared with the series' images for the tree's release."""

    rel: str
    blob: Optional[str]
    kind: str  # "pre" | "post" | "moved" | "missing"
    image: Optional[FileImage]
    dirty: bool
    symlink: bool
    writable: bool


@dataclasses.dataclass(frozen=True)
class OverlayCheck:
    """An overlay target in the tree compared with the series' overlay blob."""

    rel: str
    blob: Optional[str]
    expected: str
    kind: str  # "absent" | "ours" | "foreign"
    symlink: bool
    writable: bool


@dataclasses.dataclass(frozen=True)
class Assessment:
    """Everything preflight learned about the tree, without writing anything."""

    tree: MegatronTree
    series: Series
    files: Tuple[FileCheck, ...]
    overlay: Tuple[OverlayCheck, ...]
    record: Optional[dict]
    pending: bool  # a journal of an interrupted run that could not be repaired (read-only)

    @property
    def state(self) -> str:
        """``applied``, ``not applied``, ``partial`` or ``drifted``."""
        kinds = {f.kind for f in self.files}
        overlay = {o.kind for o in self.overlay}
        if self.pending:
            return "partial"
        if kinds & {"moved", "missing"} or "foreign" in overlay or self.symlinks:
            return "drifted"
        if kinds == {"post"} and overlay <= {"ours"}:
            return "applied"
        if kinds == {"pre"} and overlay <= {"absent"}:
            return "not applied"
        return "partial"

    @property
    def symlinks(self) -> List[str]:
        return [c.rel for c in (*self.files, *self.overlay) if c.symlink]

    @property
    def n_files(self) -> int:
        return len(self.files) + len(self.overlay)

    def counts(self) -> str:
        """``3 patches, 4 files``."""
        n = len(self.series.patches)
        files = self.n_files
        return f"{n} patch{'es' if n != 1 else ''}, {files} file{'s' if files != 1 else ''}"


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


def _classify(blob: Optional[str], images: Sequence[FileImage]) -> Tuple[str, Optional[FileImage]]:
    if blob is None:
        return "missing", None
    for attr, kind in (("pre", "pre"), ("post", "post")):
        for image in images:
            if getattr(image, attr) == blob:
                return kind, image
    return "moved", None


def assess(tree: MegatronTree, series: Series, folder: StateFolder) -> Assessment:
    """Compare the tree with ``series`` (one hash-object and one git status for all files)."""
    images = series.images_for(tree.version)
    wanted = series.touched + sorted(series.overlay)
    links = {rel for rel in wanted if _symlinked(tree.root, rel)}
    blobs = gitlayer.hash_blobs(tree.root, [rel for rel in wanted if rel not in links])
    dirty = set(gitlayer.dirty_paths(tree.repo, series.touched)) if tree.is_git else set()
    files = []
    for rel in series.touched:
        kind, image = _classify(blobs.get(rel), images[rel])
        writable = _writable(tree.root / rel)
        files.append(
            FileCheck(rel, blobs.get(rel), kind, image, rel in dirty, rel in links, writable)
        )
    overlay = []
    for rel, expected in sorted(series.overlay.items()):
        blob, target = blobs.get(rel), tree.root / rel
        absent = blob is None and rel not in links and not os.path.lexists(target)
        kind = "absent" if absent else "ours" if blob == expected else "foreign"
        overlay.append(OverlayCheck(rel, blob, expected, kind, rel in links, _writable(target)))
    pending = not folder.locked and folder.journal_path.exists()
    record = folder.read_state()
    return Assessment(tree, series, tuple(files), tuple(overlay), record, pending)


# --- problems ------------------------------------------------------------------------------


def _symlink_problem(a: Assessment) -> List[SeamError]:
    if not a.symlinks:
        return []
    return [
        UnsafePathError(
            f"symbolic link on the path of {', '.join(a.symlinks)} in {a.tree.root}",
            "mla-seam writes regular files only: replace the link with the file it points to, "
            "or run mla-seam on the tree the link points into",
        )
    ]


def _short(blob: Optional[str]) -> str:
    return blob[:12] if blob else "none"


def apply_problems(a: Assessment) -> List[SeamError]:
    """Why apply must refuse this tree, most fundamental first (empty: it may proceed)."""
    problems = _symlink_problem(a)
    dirty = [f.rel for f in a.files if f.dirty and f.kind != "post"]
    if dirty:
        problems.append(
            DirtyTreeError(
                "uncommitted changes (staged or not) on files the series patches: "
                + ", ".join(dirty),
                "commit them or stash them (git stash), then run apply again; mla-seam never "
                "writes over uncommitted work",
            )
        )
    moved = [f for f in a.files if f.kind in ("moved", "missing") and not f.dirty]
    if moved:
        detail = "; ".join(
            f"{f.rel} ({'missing' if f.kind == 'missing' else 'blob ' + _short(f.blob)}, expected "
            f"{' or '.join(_short(i.pre) for i in a.series.images_for(a.tree.version)[f.rel])})"
            for f in moved
        )
        problems.append(
            PreimageMismatchError(
                f"{len(moved)} file(s) differ from every pre-image {a.series.name} recorded for "
                f"megatron-core {a.tree.version}: {detail}",
                f"the tree is not pristine megatron-core {a.tree.version}: compare with the "
                f"release (git diff core_v{a.tree.version} -- FILE, or reinstall it); if upstream "
                "moved the code, port the series with `mla-seam rebase`",
            )
        )
    for o in a.overlay:
        if o.kind == "foreign" and not o.symlink:
            problems.append(
                OverlayConflictError(
                    f"{o.rel} already exists in {a.tree.root} and is not mla-seam's adapter "
                    f"(blob {_short(o.blob)}, ours {_short(o.expected)})",
                    "upstream or you added a file of that name: move it out of the way (keep a "
                    "copy if it is yours), then run apply again",
                )
            )
    kinds = {f.kind for f in a.files}
    if {"pre", "post"} <= kinds:
        problems.append(_partial_problem(a, "apply"))
    blocked = [f.rel for f in a.files if f.kind == "pre" and not f.writable]
    blocked += [o.rel for o in a.overlay if o.kind == "absent" and not o.writable]
    if blocked:
        problems.append(_read_only_problem(a, blocked))
    return problems


def revert_problems(a: Assessment) -> List[SeamError]:
    """Why revert must refuse this tree (empty: it may proceed)."""
    problems = _symlink_problem(a)
    edited = [f.rel for f in a.files if f.kind in ("moved", "missing")]
    edited += [o.rel for o in a.overlay if o.kind == "foreign" and not o.symlink]
    if edited:
        problems.append(
            DriftedTreeError(
                f"edited after apply (neither the patched nor the pristine content): "
                f"{', '.join(edited)}; reverting would lose those edits",
                "commit or copy your edits elsewhere and undo them (git diff / git stash in a "
                "checkout), so the files are as apply left them, then run --revert again",
            )
        )
    if {"pre", "post"} <= {f.kind for f in a.files}:
        problems.append(_partial_problem(a, "revert"))
    blocked = [f.rel for f in a.files if f.kind == "post" and not f.writable]
    blocked += [o.rel for o in a.overlay if o.kind == "ours" and not o.writable]
    if blocked:
        problems.append(_read_only_problem(a, blocked))
    return problems


def _partial_problem(a: Assessment, verb: str) -> DriftedTreeError:
    patched = [f.rel for f in a.files if f.kind == "post"]
    pristine = [f.rel for f in a.files if f.kind == "pre"]
    return DriftedTreeError(
        f"the series is half applied: patched {', '.join(patched)}; pristine "
        f"{', '.join(pristine)}; {verb} needs all of them in one state",
        "restore the patched files to the release (git checkout -- FILE in a checkout, or "
        "reinstall megatron-core), then run apply again",
    )


def _read_only_problem(a: Assessment, blocked: Sequence[str]) -> ReadOnlyTreeError:
    return ReadOnlyTreeError(
        f"cannot write {', '.join(blocked)} (or its folder) in {a.tree.root}",
        "make them writable for this user (chmod u+w, chown, or remount read-write), or run "
        "mla-seam as the tree's owner",
    )


# --- building new contents -----------------------------------------------------------------


def _overlay_bytes(series: Series) -> Dict[str, bytes]:
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


def _run_series(
    series: Series, sources: Dict[str, bytes], scratch: Path, reverse: bool, stop: bool = True
) -> Tuple[Dict[str, bytes], Dict[str, Optional[str]], List[PatchResult]]:
    """Patch copies of ``sources`` in ``scratch``; return new bytes, their blob ids, results."""
    for rel, data in sources.items():
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    results = series.apply_in(scratch, reverse=reverse, stop_on_error=stop)
    rels = sorted(sources)
    return (
        {rel: (scratch / rel).read_bytes() for rel in rels},
        gitlayer.hash_blobs(scratch, rels),
        results,
    )


def _current_bytes(a: Assessment, kinds: Sequence[str]) -> Dict[str, bytes]:
    return {f.rel: (a.tree.root / f.rel).read_bytes() for f in a.files if f.kind in kinds}


def _mismatch(
    series: Series, what: str, got: Dict[str, Optional[str]], want: Dict[str, str]
) -> None:
    bad = [rel for rel in sorted(want) if got.get(rel) != want[rel]]
    if bad:
        detail = "; ".join(f"{rel}: {_short(got.get(rel))} != {_short(want[rel])}" for rel in bad)
        raise SeriesCorruptError(
            f"{series.name}: {what} does not match the manifest ({detail})",
            "the patches and manifest.json disagree: re-export the series with "
            "`mla-seam rebase --write`; the tree was not changed",
        )


# --- modes ---------------------------------------------------------------------------------


def _applied_record(a: Assessment) -> dict:
    return {
        "applied": {
            "line": a.series.name,
            "release": a.tree.version,
            "series_sha256": a.series.sha256,
            "files": {f.rel: {"pre": f.image.pre, "post": f.image.post} for f in a.files},
            "overlay": dict(a.series.overlay),
        }
    }


def _report_offsets(results: Sequence[PatchResult]) -> None:
    offsets = [o for r in results for o in r.offsets]
    for offset in offsets:
        _emit(f"  offset: {offset}")
    if offsets:
        _emit(f"  {len(offsets)} hunk(s) applied at an offset (exact context, no fuzz)")


def do_apply(tree: MegatronTree, series: Series, folder: StateFolder) -> int:
    """Apply ``series`` to ``tree``; return the exit code (errors are raised)."""
    a = assess(tree, series, folder)
    crash_point("preflight-done")
    if a.state == "applied":
        _emit(
            f"mla-seam: already applied {series.name} ({a.counts()}) to {tree.root}; "
            "nothing changed"
        )
        return 0
    problems = apply_problems(a)
    if problems:
        raise problems[0]
    overlay = _overlay_bytes(series)
    changes: List[Change] = []
    results: List[PatchResult] = []
    if any(f.kind == "pre" for f in a.files):
        with folder.scratch() as scratch:
            new, blobs, results = _run_series(series, _current_bytes(a, ("pre",)), scratch, False)
        _mismatch(series, "the patched result", blobs, {f.rel: f.image.post for f in a.files})
        changes += [Change(f.rel, f.blob, new[f.rel], blobs[f.rel]) for f in a.files]
    changes += [
        Change(o.rel, None, overlay[o.rel], o.expected) for o in a.overlay if o.kind == "absent"
    ]
    crash_point("post-images-built")
    folder.commit("apply", changes, _applied_record(a))
    _emit(f"{series.name} for megatron-core {tree.version}: {len(changes)} file(s) written")
    _report_offsets(results)
    if tree.is_git:
        log.info(
            "mla-seam: the change is in the working tree, uncommitted; commit it when you want"
        )
    _emit(f"mla-seam: applied {series.name} ({a.counts()}) to {tree.root}")
    return 0


def _expected_pre(f: FileCheck, a: Assessment) -> str:
    """The pre-image a revert must give back: state.json's record, else the manifest's."""
    applied = (a.record or {}).get("applied") or {}
    recorded = (
        applied.get("files", {}).get(f.rel)
        if applied.get("series_sha256") == a.series.sha256
        else None
    )
    if recorded and recorded.get("post") == f.blob:
        return recorded["pre"]
    return f.image.pre


def do_revert(tree: MegatronTree, series: Series, folder: StateFolder) -> int:
    """Undo ``series`` byte-exactly and remove the overlay; return the exit code."""
    a = assess(tree, series, folder)
    crash_point("preflight-done")
    if a.state == "not applied":
        _emit(f"mla-seam: {series.name} is not applied to {tree.root}; nothing to revert")
        return 0
    problems = revert_problems(a)
    if problems:
        raise problems[0]
    changes: List[Change] = []
    if any(f.kind == "post" for f in a.files):
        with folder.scratch() as scratch:
            old, blobs, _ = _run_series(series, _current_bytes(a, ("post",)), scratch, True)
        _mismatch(
            series, "the reverted result", blobs, {f.rel: _expected_pre(f, a) for f in a.files}
        )
        changes += [Change(f.rel, f.blob, old[f.rel], blobs[f.rel]) for f in a.files]
    changes += [Change(o.rel, o.blob, None, None) for o in a.overlay if o.kind == "ours"]
    crash_point("post-images-built")
    folder.commit("revert", changes, {"applied": None})
    folder.write_state(None)
    _emit(f"mla-seam: reverted {series.name} ({a.counts()}) from {tree.root}")
    return 0


def _file_lines(a: Assessment) -> List[str]:
    words = {"pre": "pristine (pre-image ok)", "post": "already patched", "missing": "missing"}
    lines = []
    for f in a.files:
        text = words.get(
            f.kind, f"moved: blob {_short(f.blob)} is no recorded pre-image of {a.tree.version}"
        )
        extra = [
            w
            for w, on in (
                ("uncommitted changes", f.dirty and f.kind != "post"),
                ("symlink", f.symlink),
                ("not writable", not f.writable),
            )
            if on
        ]
        lines.append(f"  {f.rel}: {text}{' [' + ', '.join(extra) + ']' if extra else ''}")
    overlay_words = {
        "absent": "absent (apply adds it)",
        "ours": "present (ours)",
        "foreign": "present, NOT ours (conflict)",
    }
    for o in a.overlay:
        lines.append(
            f"  {o.rel}: overlay {overlay_words[o.kind]}{' [symlink]' if o.symlink else ''}"
        )
    return lines


def do_status(tree: MegatronTree, series: Series, folder: StateFolder) -> int:
    """Print ``applied``/``not applied``/``partial``/``drifted`` and per-file details."""
    a = assess(tree, series, folder)
    _emit(a.state)
    _emit(f"  {series.name} on {tree.describe()}")
    for line in _file_lines(a):
        _emit(line)
    applied = (a.record or {}).get("applied")
    if applied:
        notes = (
            [] if applied.get("series_sha256") == series.sha256 else ["by another series version"]
        )
        if a.state == "not applied":
            notes.append("stale: the files were restored outside mla-seam")
        _emit(
            f"  recorded: {applied.get('line')} applied for {applied.get('release')} (txn "
            f"{a.record.get('txn')}){''.join('; ' + n for n in notes)}"
        )
    if a.pending:
        _emit(
            "  an interrupted run left a journal; run `mla-seam apply` with write access to repair"
        )
    if a.state in ("applied", "not applied"):
        return 0
    log.warning(
        "mla-seam: the tree is %s: `mla-seam apply --check` explains what apply would do", a.state
    )
    return DriftedTreeError.exit_code


def _simulate(a: Assessment) -> Tuple[List[str], List[SeamError]]:
    """Run the patches on scratch copies of the tree's current files (outside the tree)."""
    if any(f.kind == "post" for f in a.files):
        return ["  patches: not simulated (files already patched)"], []
    sources = _current_bytes(a, ("pre", "moved"))
    with tempfile.TemporaryDirectory(prefix="mla-seam-check-") as tmp:
        _, blobs, results = _run_series(a.series, sources, Path(tmp), False, stop=False)
    lines, problems = [], []
    for r in results:
        state = (
            "fails: " + r.error
            if not r.ok
            else "applies with offsets" if r.offsets else "applies exactly"
        )
        lines.append(f"  patch {r.name}: {state}")
        lines += [f"    offset: {o}" for o in r.offsets]
        if not r.ok:
            problems.append(
                PatchFailedError(
                    f"{a.series.name}/{r.name} does not apply to the tree: {r.error}",
                    "the release moved under the hook: port the series with `mla-seam rebase`",
                )
            )
    if all(r.ok for r in results) and all(f.kind == "pre" for f in a.files):
        try:
            _mismatch(a.series, "the patched result", blobs, {f.rel: f.image.post for f in a.files})
        except SeriesCorruptError as exc:
            problems.append(exc)
    return lines, problems


def do_check(tree: MegatronTree, series: Series, folder: StateFolder) -> int:
    """Report what apply would do, without writing; raise apply's first problem, if any."""
    a = assess(tree, series, folder)
    _emit(f"check {series.name} on {tree.describe()}")
    for line in _file_lines(a):
        _emit(line)
    if a.state == "applied":
        _emit(
            f"mla-seam: check: {series.name} is already applied to {tree.root}; "
            "apply would change nothing"
        )
        return 0
    problems = apply_problems(a)
    if not a.symlinks:
        lines, patch_problems = _simulate(a)
        for line in lines:
            _emit(line)
        problems += patch_problems
    if problems:
        _emit(f"mla-seam: check failed: {len(problems)} problem(s); apply would refuse")
        raise problems[0]
    _emit(f"mla-seam: check passed: {series.name} ({a.counts()}) would apply to {tree.root}")
    return 0


MODES: Dict[str, Callable[[MegatronTree, Series, StateFolder], int]] = {
    "apply": do_apply,
    "check": do_check,
    "status": do_status,
    "revert": do_revert,
}


# --- the verb ------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread the way SIGINT raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _default_tree(mode: str) -> Path:
    """``./megatron-lm``: reused if it holds DEFAULT_RELEASE, materialized by apply if absent."""
    dest = Path.cwd() / DEFAULT_CHECKOUT
    if dest.exists():
        version = MegatronTree.resolve(dest).version
        if version != DEFAULT_RELEASE:
            raise UsageError(
                f"./{DEFAULT_CHECKOUT} holds megatron-core {version}, not the default "
                f"{DEFAULT_RELEASE}",
                f"pass the tree explicitly (mla-seam apply ./{DEFAULT_CHECKOUT}), or move it away "
                "to let apply materialize the default release",
            )
        return dest
    if mode != "apply":
        raise UsageError(
            f"no MEGATRON_DIR given and ./{DEFAULT_CHECKOUT} does not exist",
            f"pass the tree to work on, or run `mla-seam apply` to create ./{DEFAULT_CHECKOUT}",
        )
    try:
        from mla_seam import upstream  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise UpstreamError(
            f"cannot materialize releases here: {exc}", "pass MEGATRON_DIR"
        ) from None
    log.info(
        "mla-seam: materializing megatron-core %s into ./%s", DEFAULT_RELEASE, DEFAULT_CHECKOUT
    )
    return Path(upstream.get(DEFAULT_RELEASE, into=dest))


def _select_series(tree: MegatronTree, forced: Optional[str]) -> Series:
    return series_by_name(forced) if forced else find_series(tree.version)


def _interrupted(folder: StateFolder, exc: BaseException) -> InterruptedRunError:
    """Repair after SIGINT/SIGTERM, and say truthfully what state the tree is in."""
    name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
    done = len(folder.repairs)
    repairs = folder.recover()[done:] if folder.locked else []
    if repairs:
        what, hint = "; ".join(repairs), "run the command again if you still want it"
    elif folder.committed:
        what = f"the {folder.committed} had already been committed and is complete"
        hint = "nothing to do: `mla-seam apply --status` shows the state"
    else:
        what, hint = "nothing had been written to the tree", "run the command again if you want it"
    err = InterruptedRunError(f"interrupted by {name}: {what}", hint)
    err.exit_code = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
    return err


def _execute(args: argparse.Namespace) -> int:
    tree_dir = Path(args.megatron_dir) if args.megatron_dir else _default_tree(args.mode)
    tree = MegatronTree.resolve(tree_dir)
    folder = StateFolder(tree)
    with folder.session(write=args.mode in ("apply", "revert")):
        try:
            crash_point("locked")
            if folder.locked:
                for note in folder.recover():
                    log.warning("mla-seam: repaired: %s", note)
            series = _select_series(tree, args.series)
            code = MODES[args.mode](tree, series, folder)
        except (KeyboardInterrupt, _Terminated) as exc:
            raise _interrupted(folder, exc) from None
    if args.mode == "apply" and not args.megatron_dir and code == 0:
        _emit(adapter_summary(tree))
    return code


def run(args: argparse.Namespace) -> int:
    """Run the verb; SIGTERM is turned into an exception for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return _execute(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _execute(args)
    except _Terminated:  # outside the locked section: nothing was being written
        err = InterruptedRunError("interrupted by SIGTERM", "run the command again if you want it")
        err.exit_code = 128 + signal.SIGTERM
        raise err from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary_python() -> str:
    """``$MLA_SEAM_PYTHON``, else the first of this interpreter and ``python3`` on PATH that can
    import torch (the adapter needs it), else this interpreter (which then reports why)."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        return override
    candidates = [sys.executable] + [p for p in [shutil.which("python3")] if p]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    for python in candidates:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if (
                subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
                == 0
            ):
                return python
    return sys.executable


def adapter_summary(tree: Union[MegatronTree, os.PathLike]) -> str:
    """The adapter's ``describe_default()`` line, computed in a subprocess on ``tree``.

    The interpreter comes from :func:`_summary_python`; the tree goes first on PYTHONPATH. A
    failed import yields the reason instead of an exception.
    """
    root = tree.root if isinstance(tree, MegatronTree) else Path(tree)
    python = _summary_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = (
        "from megatron.core.transformer.mla_adapter import describe_default\n"
        "print(describe_default())"
    )
    try:
        proc = subprocess.run(
            [python, "-c", code],
            cwd=str(root),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"adapter summary unavailable: {exc}"
    if proc.returncode == 0:
        return proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit {proc.returncode}"
    return (
        f"adapter summary unavailable ({python}): {reason} "
        f"(set {PYTHON_ENV} to a python that has torch and the Megatron dependencies)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``apply`` verb to the CLI."""
    parser = subparsers.add_parser(
        "apply",
        help="apply, check, show or revert the MLA adapter series on a Megatron tree",
        description=(
            "Apply the MLA adapter and its hook patches to MEGATRON_DIR, atomically and strictly "
            "(no fuzz); nothing is committed. Without MEGATRON_DIR: materialize megatron-core "
            f"{DEFAULT_RELEASE} into ./{DEFAULT_CHECKOUT}, apply, and print the adapter summary."
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        dest="mode",
        action="store_const",
        const="check",
        help="report what apply would do, write nothing; exit 0 only if it would succeed",
    )
    mode.add_argument(
        "--status",
        dest="mode",
        action="store_const",
        const="status",
        help="print applied / not applied / partial / drifted with per-file details",
    )
    mode.add_argument(
        "--revert",
        dest="mode",
        action="store_const",
        const="revert",
        help="undo the series byte-exactly and remove the adapter file",
    )
    parser.add_argument(
        "--series",
        metavar="LINE",
        help="use this release line (e.g. core_v0.19) instead of the one matching the version",
    )
    parser.add_argument("megatron_dir", nargs="?", metavar="MEGATRON_DIR", help="the Megatron tree")
    parser.set_defaults(mode="apply", func=run)
