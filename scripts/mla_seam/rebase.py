"""The ``rebase`` verb: move a release line's hook series onto another upstream tag.

::

    mla-seam rebase --megatron DIR --onto TAG [--from LINE] [--write] [--accept-three-way]
                    [--keep PATH] [--resolved REF] [--releases V,V] [--json FILE]
    mla-seam rebase --refresh-overlay [--check]

Everything happens in a scratch repository: a ``git clone --shared`` of DIR (it borrows DIR's
objects and never writes to DIR) plus any release DIR lacks, fetched from the mla-seam cache.
``patches/`` changes only with ``--write``, and then in one rename.

The survey (:mod:`mla_seam.survey`, shared with ``drift``) classifies every patch of the
old series on TAG: exact, offset, three_way, conflict, upstream or obsolete.

The report also holds the contract drift between the two tags (probes of the upstream API the
adapter relies on) and a range-diff of the old series against the new one. Conflicts are
resolved by a human: ``--keep PATH`` keeps the scratch repository with branch
``mla-seam/rebase`` (the carried patches) and the conflicting patches' messages; commit the hook
there, then ``--megatron PATH --resolved mla-seam/rebase --write`` exports it (see
``patches/README.md``). Exports are byte-stable: the same commits give the same bytes, so a
patch whose applied result did not change keeps its bytes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import git
from mla_seam import contracts, gitlayer, paths, releases, upstream
from mla_seam.errors import (
    DirtyTreeError,
    InterruptedRunError,
    PatchFailedError,
    RebaseError,
    UsageError,
)
from mla_seam.export import _releases_of_line as releases_of_line  # one home of that list
from mla_seam.export import export_line, export_target, install_line
from mla_seam.overlay_refresh import refresh_overlay
from mla_seam.series import Series, json_bytes, series_by_name
from mla_seam.survey import (
    Survey,
    Workspace,
    load_lines,
    series_for_ref,
    survey,
)
from mla_seam.survey.engine import series_range_diff
from mla_seam.tree import MegatronTree, crash_point

log = logging.getLogger(__name__)

REBASE_BRANCH = "mla-seam/rebase"
KEEP_NOTES = "mla-seam-rebase"  # folder inside the kept repository's .git


def _emit(text: str) -> None:
    """The one place result lines are written to stdout."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _pick_series(
    root: Path, onto: str, version: str, forced: Optional[str], repo: git.Repo
) -> Series:
    if forced:
        return series_by_name(forced, root, option="--from")
    return series_for_ref(load_lines(root, strict=False), onto, version, repo)[0]


def _user_repo(megatron: Path) -> Tuple[MegatronTree, git.Repo]:
    tree = MegatronTree.resolve(megatron)
    if tree.repo is None:
        raise RebaseError(
            f"{tree.root} is not a git checkout: rebase needs the upstream tags",
            "clone Megatron-LM with its tags, or make a checkout from the sdists: "
            "mla-seam upstream get --into NEW_DIR core_v0.16.1 core_v0.17.1",
        )
    dirty = gitlayer.modified_tracked(tree.repo, "megatron")
    if dirty:
        raise DirtyTreeError(
            f"{tree.root} has uncommitted changes under megatron/ ({', '.join(dirty[:4])}"
            f"{', ...' if len(dirty) > 4 else ''})",
            "rebase reads committed tags only and would ignore them: commit or stash them "
            "(if the series is applied: mla-seam apply --revert DIR)",
        )
    return tree, tree.repo


def _report(s: Survey) -> None:
    _emit(
        f"mla-seam rebase: {s.series.name} (base {s.old_tag}) onto {s.onto} "
        f"(megatron-core {s.onto_version}, {s.onto_commit[:12]}, from {s.onto_source})"
    )
    _emit(f"  history: {s.history_note}")
    for p in s.patches:
        _emit(f"  {p.hook:<3} {p.name}: {p.cls.value}: {p.detail}")
    changes = s.changes
    _emit(f"contracts {s.old_tag} -> {s.onto}: {len(changes) or 'no'} change(s)")
    for change in changes:
        _emit(f"  {change.describe()}")
    for problem in contracts.adapter_problems(s.new_contracts):
        _emit(f"  adapter needs work: {problem}")
    if s.range_diff.strip():
        _emit("range-diff (old series vs new):")
        for line in s.range_diff.rstrip().splitlines():
            _emit(f"  {line}")
    counts = ", ".join(f"{n} {c}" for c, n in s.counts().items() if n)
    _emit(f"result: {counts}")


def _keep_notes(ws: Workspace, s: Survey) -> None:
    gitlayer.checkout_branch(ws.repo, REBASE_BRANCH, s.new_head)
    target = releases.moving_target(s.onto)
    if target:  # a branch of the checkout: a clone of the kept repository must find it too
        gitlayer.set_branch(ws.repo, target, s.onto_commit)
    notes = gitlayer.git_dir(ws.repo) / KEEP_NOTES
    notes.mkdir(exist_ok=True)
    for p in s.conflicts:
        patch = s.series.line_dir / p.name
        info = gitlayer.mailinfo(patch.read_bytes(), ws.root)
        message = info["subject"] + "\n" + ("\n" + info["body"] if info["body"] else "")
        (notes / f"{p.name}.msg").write_text(message, encoding="utf-8")
        shutil.copyfile(patch, notes / p.name)
    (notes / "survey.json").write_bytes(json_bytes(s.to_json()))
    _emit(f"kept: {ws.root} (branch {REBASE_BRANCH} = {s.onto} + carried patches)")
    for p in s.conflicts:
        _emit(
            f"  write {p.hook} by hand there, then: git commit -a -F "
            f".git/{KEEP_NOTES}/{p.name}.msg  (original patch: .git/{KEEP_NOTES}/{p.name})"
        )
    onto = target or s.onto
    _emit(
        f"  then: mla-seam rebase --megatron {ws.root} --onto {onto} --from {s.series.line} "
        f"--resolved {REBASE_BRANCH} --write"
    )


def _resolved_report(ws: Workspace, s: Survey, head: str) -> List[Dict[str, str]]:
    """Each commit of ``onto..head``: ``as surveyed`` (same patch-id as the survey's) or by hand."""
    touched = sorted({f for p in s.series.patches for f in p.files} | _files(ws, s, head))
    surveyed = set(gitlayer.commit_patch_ids(ws.repo, f"{s.onto_commit}..{s.new_head}", touched))
    resolved = gitlayer.commit_patch_ids(ws.repo, f"{s.onto_commit}..{head}", touched)
    by_commit = {sha: pid for pid, sha in resolved.items()}
    rows = []
    for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{head}"):
        how = "as surveyed" if by_commit.get(sha) in surveyed else "written by hand"
        rows.append({"commit": sha, "subject": gitlayer.commit_subject(ws.repo, sha), "how": how})
    return rows


def _files(ws: Workspace, s: Survey, head: str) -> Set[str]:
    return {
        path
        for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{head}")
        for _, path in gitlayer.changed_paths(ws.repo, sha)
    }


def _resolved_head(ws: Workspace, tree_repo: git.Repo, ref: str, s: Survey) -> str:
    commit = gitlayer.resolve_commit(tree_repo, ref)
    if commit is None:
        raise UsageError(
            f"--resolved {ref}: no such ref in the checkout", "name a branch or commit"
        )
    if not gitlayer.is_ancestor(ws.repo, s.onto_commit, commit):
        raise RebaseError(
            f"--resolved {ref} does not descend from {s.onto}",
            f"commit the hooks on top of {s.onto} (branch {REBASE_BRANCH} of a --keep folder)",
        )
    for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{commit}"):
        bad = [f"{st} {p}" for st, p in gitlayer.changed_paths(ws.repo, sha) if st != "M"]
        if bad:
            raise RebaseError(
                f"commit {sha[:12]} of --resolved does more than edit files: {', '.join(bad)}",
                "hooks only edit upstream files in place; new files belong in overlay/",
            )
    return commit


def _write(ws: Workspace, s: Survey, head: str, args: argparse.Namespace, root: Path) -> None:
    version = s.onto_version
    moving = releases.moving_target(s.onto)
    target = root / releases.series_folder(s.onto, version)
    if moving and args.releases:
        raise UsageError(
            f"--releases {args.releases}: the {moving} series serves the commit it is made from",
            f"leave --releases out for --onto {s.onto}",
        )
    if head == s.onto_commit:
        raise RebaseError(
            f"no patch is left for {target.name}: every hook is upstream or obsolete on {s.onto}",
            "nothing to write; if that is right, the line needs no series (the adapter alone)",
        )
    with tempfile.TemporaryDirectory(prefix="mla-seam-export-") as tmp:
        staged = Path(tmp) / target.name
        only = args.releases.split(",") if args.releases else None
        try:
            if moving:
                export_target(ws, s.onto_commit, head, s.onto, moving, staged)
            else:
                # The export reads the hooked files at every release of the line: a partial
                # clone fetches them in one batch first.
                others = [v for v in releases_of_line(ws, version, only) if v != version]
                ws.ensure([ws.resolve(upstream.tag_for(v))[0] for v in others], s.series.touched)
                export_line(ws, s.onto_commit, head, s.onto, version, staged, only)
        except PatchFailedError as err:
            raise RebaseError(
                f"the new {target.name} series does not serve every release of the line: "
                f"{err.message}",
                "give that release its own base (rebase --onto it), or list the releases the "
                "line serves with --releases",
            ) from None
        crash_point("rebase-exported")
        delta = install_line(staged, target)
    _emit(
        f"wrote {target}: {len(delta['unchanged'])} file(s) unchanged (bytes kept), "
        f"{len(delta['changed'])} changed, {len(delta['added'])} added, "
        f"{len(delta['removed'])} removed"
    )
    for kind in ("changed", "added", "removed"):
        for name in delta[kind]:
            _emit(f"  {kind}: {name}")


def _check_writable(s: Survey, args: argparse.Namespace) -> None:
    if args.resolved:
        return
    if s.conflicts:
        names = ", ".join(f"{p.hook} {p.name}" for p in s.conflicts)
        raise RebaseError(
            f"{len(s.conflicts)} patch(es) conflict on {s.onto}: {names}; nothing written",
            "write those hooks by hand: re-run with --keep PATH, commit them there, then "
            "--megatron PATH --resolved mla-seam/rebase --write (patches/README.md)",
        )
    if args.write and s.three_way and not args.accept_three_way:
        names = ", ".join(f"{p.hook} {p.name}" for p in s.three_way)
        raise RebaseError(
            f"{len(s.three_way)} patch(es) needed a 3-way merge: {names}; nothing written",
            "review the range-diff above, then re-run with --accept-three-way",
        )


def _run_rebase(args: argparse.Namespace) -> int:
    root = paths.patches_dir()
    if args.refresh_overlay:
        stale = refresh_overlay(root, args.check)
        verb = "stale" if args.check else "refreshed"
        _emit(f"mla-seam rebase --refresh-overlay: {verb}: {', '.join(stale) or 'none'}")
        if args.check and stale:
            raise RebaseError(
                f"the overlay blob recorded by {', '.join(stale)} is not the overlay's",
                "run `mla-seam rebase --refresh-overlay` and commit the manifests",
            )
        return 0
    if not args.megatron or not args.onto:
        raise UsageError("--megatron and --onto are required", "see mla-seam rebase --help")
    tree, user = _user_repo(Path(args.megatron))
    keep = Path(args.keep) if args.keep else None
    with Workspace.create(tree.root, keep) as ws:
        onto_commit, _ = ws.resolve(args.onto)
        version = ws.version_at(onto_commit)
        series = _pick_series(root, args.onto, version, args.from_line, ws.repo)
        s = survey(ws, series, args.onto)
        head = s.new_head
        resolved: List[Dict[str, str]] = []
        if args.resolved:
            head = _resolved_head(ws, user, args.resolved, s)
            s.range_diff = series_range_diff(ws, s.old_commit, s.old_head, s.onto_commit, head)
            resolved = _resolved_report(ws, s, head)
        crash_point("rebase-surveyed")
        _report(s)
        if resolved:
            _emit(f"resolved ({args.resolved}): the new series is {s.onto}..{args.resolved}")
            for row in resolved:
                _emit(f"  {row['commit'][:12]} {row['subject']}: {row['how']}")
        if args.json:
            Path(args.json).write_bytes(json_bytes(dict(s.to_json(), resolved=resolved)))
        if keep is not None:
            _keep_notes(ws, s)
        _check_writable(s, args)
        if args.write:
            _write(ws, s, head, args, root)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread the way SIGINT raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    """Run the verb; SIGINT/SIGTERM unwind (the scratch repository is removed on the way)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_rebase(args)
    except (KeyboardInterrupt, _Terminated) as exc:
        name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        err = InterruptedRunError(
            f"interrupted by {name}: the scratch repository was removed and the checkout was "
            "not written; patches/ holds the old line folder or the whole new one, never a mix",
            "run the command again",
        )
        err.exit_code = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
        raise err from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rebase`` verb to the CLI."""
    parser = subparsers.add_parser(
        "rebase",
        help="survey (and with --write export) a hook series on another upstream tag",
        description=(
            "Try every patch of a release line on TAG in a scratch clone of DIR and classify it "
            "(exact, offset, three_way, conflict, upstream, obsolete); report contract drift and "
            "a range-diff. DIR and patches/ are untouched unless --write (patches/ only)."
        ),
    )
    parser.add_argument("--megatron", metavar="DIR", help="git checkout of Megatron-LM (clean)")
    parser.add_argument(
        "--onto",
        metavar="TAG",
        help="tag (or ref) of the new upstream base; a moving target's branch (main, dev, "
        "origin/dev) writes patches/<branch>/",
    )
    parser.add_argument(
        "--from",
        dest="from_line",
        metavar="LINE",
        help="release line to start from (core_v0.16 or 0.16, or main / dev); default: the "
        "series of TAG when TAG names a moving target (main, dev) that has one, else the line "
        "serving TAG, else the newest older line",
    )
    parser.add_argument(
        "--write", action="store_true", help="export the new series into patches/<line>/"
    )
    parser.add_argument(
        "--accept-three-way",
        action="store_true",
        help="with --write: carry patches that needed a 3-way merge (after review)",
    )
    parser.add_argument(
        "--keep",
        metavar="PATH",
        help=f"keep the scratch repository at PATH (branch {REBASE_BRANCH}) to write hooks by hand",
    )
    parser.add_argument(
        "--resolved",
        metavar="REF",
        help="export TAG..REF of DIR (hooks written by hand) instead of the survey's result",
    )
    parser.add_argument(
        "--releases",
        metavar="V,V",
        help="releases the written line serves (default: every known release of TAG's line)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the survey as JSON")
    parser.add_argument(
        "--refresh-overlay",
        action="store_true",
        help="record the current overlay blob in every line's manifest (after adapter edits)",
    )
    parser.add_argument(
        "--check", action="store_true", help="with --refresh-overlay: only report stale lines"
    )
    parser.set_defaults(func=run)
