"""Commit mode (``mla-seam apply --commit``): the series as commits on the checked-out branch.

For fork owners who keep the series in their history: one commit per patch, carrying the
patch's own message (with its DEP-3 header: Hook, Origin, Bug, Forwarded, Last-Update ...) and
author like ``git am``, plus one commit adding the adapter. A patch whose hunks the fork already
holds is left out (every hunk) or committed without them, and a patch merged with ``--3way``
says so in its message (``mla-seam: merged 3-way ...``): review those. ``--revert --commit``
adds one revert commit per recorded commit, newest first, like ``git revert``: history is never
rewritten.

A run checks first (:func:`preflight`, also what ``--check --commit`` runs): a git checkout with
a commit, no git lock held by anyone (``index.lock``, HEAD's or the branch's ref lock), nothing
applied yet. The commits are then built with plumbing (a temporary index, ``commit-tree``): only
objects, no ref moves. The work-tree files, the state record and the HEAD move are one journaled
transaction (:meth:`mla_seam.statefolder.StateFolder.commit`): HEAD moves right after the commit
point, and a run killed anywhere is rolled back or completed by the next run, HEAD included.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

from mla_seam import gitlayer
from mla_seam.assess import POST, Assessment
from mla_seam.engine import Plan
from mla_seam.errors import (
    DirtyTreeError,
    GitLockedError,
    HeadMovedError,
    UsageError,
)
from mla_seam.patching import Step, in_fork_text
from mla_seam.record import HeadMove
from mla_seam.statefolder import StateFolder

log = logging.getLogger(__name__)

ADAPTER_SUBJECT = "mla-seam: add the MLA adapter ({name})"


def _require_repo(a: Assessment) -> None:
    if not a.tree.is_git or gitlayer.head_commit(a.tree.repo) is None:
        raise UsageError(
            f"--commit needs a git checkout with a commit checked out; {a.tree.root} is "
            f"{'a plain folder' if not a.tree.is_git else 'a repository without commits'}",
            "drop --commit to apply in working-tree mode",
        )


def check_locks(a: Assessment, verb: str) -> None:
    """Refuse when git's locks are held (before anything is written or moved)."""
    locks = gitlayer.held_locks(a.tree.repo)
    if locks:
        raise GitLockedError(
            f"git's lock {', '.join(map(str, locks))} exists: another git process is working in "
            f"this repository, or one crashed and left it; {verb} --commit must move HEAD and "
            "the index",
            "wait for the other git command to end; if none is running, remove the stale lock "
            f"(rm {locks[0]}) and run again; nothing was changed",
        )


def preflight(a: Assessment) -> None:
    """What ``apply --commit`` needs before anything is written (``--check --commit`` too)."""
    _require_repo(a)
    if any(f.kind == POST for f in a.files):
        raise UsageError(
            "--commit applies to a tree where nothing is applied yet; this one is patched "
            f"by {a.applier.tool if a.applier else 'mla-seam'}",
            "revert it first (mla-seam apply --revert [--commit]), then apply --commit",
        )
    check_locks(a, "apply")


def _committer(a: Assessment) -> Tuple[str, str]:
    ident = gitlayer.current_ident(a.tree.repo)
    return ident if ident else (gitlayer.SEAM_IDENT["name"], gitlayer.SEAM_IDENT["email"])


def _message(info: Dict[str, str], step: Step) -> str:
    """The patch's own message, plus a paragraph on hunks left out and 3-way merges."""
    notes = [f"mla-seam: {in_fork_text(h)}; left out here" for h in step.in_fork]
    if step.how == "3way":
        notes.append(
            "mla-seam: merged 3-way onto the fork's "
            f"{', '.join(sorted(step.files))} (git merge-file, no conflicts): review the hunks"
        )
    parts = [info["body"].strip("\n")] if info.get("body", "").strip() else []
    if notes:
        parts.append("\n".join(notes))
    return info.get("subject", step.patch.name) + "".join("\n\n" + p for p in parts) + "\n"


def build_commits(
    a: Assessment, plan: Plan, adapter: Dict[str, bytes]
) -> Tuple[List[str], Optional[HeadMove]]:
    """Create the series' commits on top of HEAD (objects only; no ref moves).

    Returns the commit ids and the HEAD move the transaction makes (``None``: nothing to
    commit, every hook already in the fork).
    """
    repo = a.tree.repo
    head = gitlayer.head_commit(repo)
    assert head is not None
    committer = _committer(a)
    entries = gitlayer.tree_entries(repo, head, [*a.series.touched, *adapter])
    steps = [(s, stage) for s, stage in zip(plan.steps, plan.stages) if s.how != "in-fork"]
    contents = [stage[rel] for s, stage in steps for rel in sorted(s.patch.files) if rel in stage]
    contents += [data for rel, data in sorted(adapter.items())]
    blobs = iter(gitlayer.store_blobs(repo, contents))
    parent = head
    ids: List[str] = []
    with gitlayer.TreeBuilder(repo, head) as trees:
        for step, stage in steps:
            info = gitlayer.mailinfo(step.patch.path.read_bytes(), a.tree.root)
            files = {
                rel: (entries.get(rel, ("100644", ""))[0], next(blobs))
                for rel in sorted(step.patch.files)
                if rel in stage
            }
            author = (info.get("author", committer[0]), info.get("email", committer[1]),
                      info.get("date", ""))  # fmt: skip
            parent = gitlayer.commit_tree(repo, trees.tree(files), parent, _message(info, step),
                                          author, committer)  # fmt: skip
            ids.append(parent)
        for rel, data in sorted(adapter.items()):
            blob = next(blobs)
            if entries.get(rel, ("", ""))[1] == blob:
                continue  # the fork already commits this very adapter
            message = (
                ADAPTER_SUBJECT.format(name=rel.rsplit("/", 1)[-1])
                + f"\n\nThe one file mla-seam adds to the tree ({rel}), for {a.series.name}.\n"
            )
            stamp = (committer[0], committer[1], f"{int(time.time())} +0000")
            tree = trees.tree({rel: ("100644", blob)})
            parent = gitlayer.commit_tree(repo, tree, parent, message, stamp, committer)
            ids.append(parent)
    if not ids:
        return [], None
    paths = sorted(set(a.series.touched) | set(a.series.overlay))
    return ids, HeadMove(head, parent, paths, f"apply {a.series.name}")


def revert_preflight(a: Assessment) -> Dict[str, List[str]]:
    """What ``--revert --commit`` needs before anything is written; returns the series' commits
    (oldest first) with the paths each one changes.

    Raises:
        UsageError: not a git checkout, or the tree was applied in working-tree mode.
        HeadMovedError: the series' commits are not in HEAD's history.
        DirtyTreeError: later commits changed the files the series' commits touch.
        GitLockedError: a git lock is held.
    """
    _require_repo(a)
    applied = a.applier.record if a.applier else None
    commits: List[str] = list(applied.commits) if applied is not None else []
    if not commits or applied is None:
        raise UsageError(
            f"--revert --commit reverts the commits of `apply --commit`; {a.tree.root} was "
            "applied in working-tree mode (nothing of the series is committed by mla-seam)",
            "revert without --commit (the files go back; commit that when you want)",
        )
    repo = a.tree.repo
    head = gitlayer.head_commit(repo)
    if not gitlayer.is_ancestor(repo, commits[-1], head):
        raise HeadMovedError(
            f"the series' commits ({commits[0][:12]}..{commits[-1][:12]}) are not in the "
            f"history of HEAD ({(head or '')[:12]}): the branch was switched or reset",
            "check out the branch that has them and run again, or revert without --commit",
        )
    changes = {c: [rel for _, rel in gitlayer.changed_paths(repo, c)] for c in commits}
    touched = sorted({rel for paths in changes.values() for rel in paths})
    work = gitlayer.tree_blobs(repo, "HEAD", touched)
    recorded = {**{r: f.post for r, f in applied.files.items()}, **applied.overlay}
    changed = [rel for rel in touched if rel in recorded and work.get(rel) != recorded[rel]]
    if changed:
        raise DirtyTreeError(
            f"commits after the series changed {', '.join(changed)}: reverting the series' "
            "commits would undo them too",
            "revert those commits first, or revert without --commit",
        )
    check_locks(a, "--revert")
    return changes


def revert_commits(
    a: Assessment, commits: Dict[str, List[str]], paths: List[str]
) -> Tuple[List[str], HeadMove]:
    """One revert commit per series commit, newest first (objects only)."""
    repo = a.tree.repo
    head = gitlayer.head_commit(repo)
    assert head is not None
    committer = _committer(a)
    subjects = gitlayer.commit_subjects(repo, list(commits))
    parent = head
    ids: List[str] = []
    with gitlayer.TreeBuilder(repo, head) as trees:
        for commit in reversed(list(commits)):
            before = gitlayer.tree_entries(repo, f"{commit}^", commits[commit])
            files = {rel: before.get(rel) for rel in commits[commit]}
            message = f'Revert "{subjects.get(commit, commit)}"\n\nThis reverts commit {commit}.\n'
            stamp = (committer[0], committer[1], f"{int(time.time())} +0000")
            parent = gitlayer.commit_tree(repo, trees.tree(files), parent, message, stamp,
                                          committer)  # fmt: skip
            ids.append(parent)
    return ids, HeadMove(head, parent, sorted(set(paths)), f"revert {a.series.name}")


def finish(a: Assessment, folder: StateFolder) -> Optional[str]:
    """Complete a commit-mode apply of an older mla-seam whose HEAD move was interrupted after
    its journal was gone (schema 1 records: 0.2.0 development builds moved HEAD outside the
    transaction); return a note if it did. Newer records never need this: their journal
    carries the HEAD move."""
    applied = a.applier.record if a.applier and a.applier.source == "record" else None
    if a.record is None or a.record.schema != 1:
        return None
    if applied is None or applied.mode != "commit" or not a.tree.is_git or folder.pending():
        return None
    head = gitlayer.head_commit(a.tree.repo)
    if head != applied.head_before or not applied.head_after:
        return None
    check_locks(a, "apply")
    paths = sorted(set(applied.files) | set(applied.overlay))
    gitlayer.move_head(a.tree.repo, applied.head_after, head, "mla-seam: finish apply --commit")
    gitlayer.reset_index(a.tree.repo, applied.head_after, paths)
    return f"moved HEAD to the series' last commit {applied.head_after[:12]} (interrupted run)"
