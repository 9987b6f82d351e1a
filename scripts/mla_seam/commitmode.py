"""Commit mode (``mla-seam apply --commit``): the series as commits on the checked-out branch.

For fork owners who keep the series in their history: one commit per patch, carrying the
patch's own message (with its DEP-3 header: Hook, Origin, Bug, Forwarded, Last-Update ...) and
author like ``git am``, plus one commit adding the adapter. ``--revert --commit`` adds one
revert commit per recorded commit, newest first, like ``git revert``: history is never
rewritten.

The commits are built with plumbing (a temporary index, ``commit-tree``) before anything is
written; then the work-tree files go in through the journaled transaction with the state record
(the commit point), and only then does HEAD move (``update-ref`` checked against the old value)
and the index entries of the touched paths follow it. A run killed between the state record and
the ref move is finished by the next run (:func:`finish`).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

from mla_seam import gitlayer
from mla_seam.assess import Assessment
from mla_seam.engine import Plan
from mla_seam.errors import DirtyTreeError, GitError, UsageError
from mla_seam.series import Series
from mla_seam.tree import StateFolder

log = logging.getLogger(__name__)

ADAPTER_SUBJECT = "mla-seam: add the MLA adapter ({name})"


def _require_repo(a: Assessment) -> None:
    if not a.tree.is_git or gitlayer.head_commit(a.tree.repo) is None:
        raise UsageError(
            f"--commit needs a git checkout with a commit checked out; {a.tree.root} is "
            f"{'a plain folder' if not a.tree.is_git else 'a repository without commits'}",
            "drop --commit to apply in working-tree mode",
        )


def _committer(a: Assessment) -> Tuple[str, str]:
    ident = gitlayer.current_ident(a.tree.repo)
    return ident if ident else (gitlayer.SEAM_IDENT["name"], gitlayer.SEAM_IDENT["email"])


def _stages(
    series: Series, sources: Dict[str, bytes], folder: StateFolder
) -> List[Dict[str, bytes]]:
    """The committed-form bytes of the touched files after each patch, in order."""
    from mla_seam.engine import run_series  # pylint: disable=import-outside-toplevel

    stages = []
    current = dict(sources)
    for patch in series.patches:
        one = Series(
            series.name, series.line_dir, series.line, series.releases, series.upstream,
            series.overlay, (patch,), series.files, series.sha256,
        )  # fmt: skip
        with folder.scratch() as scratch:
            current, results = run_series(one, current, scratch)
        if not all(r.ok for r in results):
            raise GitError(
                f"{patch.name} does not apply on its own in order; commit mode needs each patch "
                "to apply strictly",
                "apply in working-tree mode (without --commit)",
            )
        stages.append(dict(current))
    return stages


def build_commits(
    a: Assessment,
    plan: Plan,
    folder: StateFolder,
    sources: Dict[str, bytes],
    adapter: Dict[str, bytes],
) -> List[str]:
    """Create the series' commits on top of HEAD (objects only; no ref moves). Returns ids."""
    _require_repo(a)
    if plan.method == "3way":
        raise UsageError(
            "--commit cannot record a 3-way merge as the series' commits",
            "apply with --3way in working-tree mode and commit the result yourself",
        )
    repo = a.tree.repo
    head = gitlayer.head_commit(repo)
    committer = _committer(a)
    modes = gitlayer.file_modes(repo, head, a.series.touched)
    parent = head
    ids: List[str] = []
    for patch, stage in zip(a.series.patches, _stages(a.series, sources, folder)):
        info = gitlayer.mailinfo(patch.path.read_bytes(), a.tree.root)
        files = {
            rel: (modes.get(rel, "100644"), gitlayer.store_blob(repo, data))
            for rel, data in stage.items()
            if rel in patch.files
        }
        tree = gitlayer.tree_with(repo, parent, files)
        message = info.get("subject", patch.name) + ("\n\n" + info["body"] if info["body"] else "")
        author = (info.get("author", committer[0]), info.get("email", committer[1]),
                  info.get("date", ""))  # fmt: skip
        parent = gitlayer.commit_tree(repo, tree, parent, message.rstrip("\n") + "\n", author,
                                      committer)  # fmt: skip
        ids.append(parent)
    for rel, data in sorted(adapter.items()):
        tree = gitlayer.tree_with(repo, parent, {rel: ("100644", gitlayer.store_blob(repo, data))})
        message = (
            ADAPTER_SUBJECT.format(name=rel.rsplit("/", 1)[-1])
            + f"\n\nThe one file mla-seam adds to the tree ({rel}), for {a.series.name}.\n"
        )
        stamp = (committer[0], committer[1], f"{int(time.time())} +0000")
        parent = gitlayer.commit_tree(repo, tree, parent, message, stamp, committer)
        ids.append(parent)
    plan.record["applied"].update(mode="commit", commits=ids, head_before=head, head_after=parent)
    return ids


def revert_commits(a: Assessment, plan: Plan) -> List[str]:
    """One revert commit per recorded commit, newest first (objects only). Returns ids."""
    _require_repo(a)
    repo = a.tree.repo
    applied = (a.applier.record or {}) if a.applier else {}
    commits: List[str] = list(applied.get("commits") or [])
    head = gitlayer.head_commit(repo)
    if not commits or not gitlayer.is_ancestor(repo, commits[-1], head):
        raise UsageError(
            "the series' commits are not in the history of HEAD (branch switched, or reset)",
            "check out the branch that has them, or revert without --commit",
        )
    touched = sorted({rel for c in commits for _, rel in gitlayer.changed_paths(repo, c)})
    work = gitlayer.tree_blobs(repo, "HEAD", touched)
    recorded = {**{r: f["post"] for r, f in applied.get("files", {}).items()},
                **applied.get("overlay", {})}  # fmt: skip
    changed = [rel for rel in touched if rel in recorded and work.get(rel) != recorded[rel]]
    if changed:
        raise DirtyTreeError(
            f"commits after the series changed {', '.join(changed)}: reverting the series' "
            "commits would undo them too",
            "revert those commits first, or revert without --commit",
        )
    committer = _committer(a)
    parent = head
    ids: List[str] = []
    for commit in reversed(commits):
        paths = [rel for _, rel in gitlayer.changed_paths(repo, commit)]
        before = gitlayer.tree_blobs(repo, f"{commit}^", paths)
        modes = gitlayer.file_modes(repo, f"{commit}^", paths)
        files: Dict[str, Optional[Tuple[str, str]]] = {
            rel: ((modes.get(rel, "100644"), blob) if blob else None)
            for rel, blob in before.items()
        }
        tree = gitlayer.tree_with(repo, parent, files)
        subject = gitlayer.commit_subject(repo, commit)
        message = f'Revert "{subject}"\n\nThis reverts commit {commit}.\n'
        stamp = (committer[0], committer[1], f"{int(time.time())} +0000")
        parent = gitlayer.commit_tree(repo, tree, parent, message, stamp, committer)
        ids.append(parent)
    plan.record = {"applied": None, "reverted": {"commits": ids, "head_before": head}}
    plan.kept = []
    return ids


def move_head(a: Assessment, old: str, new: str, paths: List[str], why: str) -> None:
    """Move HEAD from ``old`` to ``new`` and point the touched index entries at it."""
    repo = a.tree.repo
    gitlayer.move_head(repo, new, old, f"mla-seam: {why}")
    gitlayer.reset_index(repo, new, paths)


def finish(a: Assessment, folder: StateFolder) -> Optional[str]:
    """Complete a commit-mode apply whose ref move was interrupted; return a note if it did."""
    applied = (a.applier.record or {}) if a.applier and a.applier.source == "record" else {}
    if applied.get("mode") != "commit" or not a.tree.is_git:
        return None
    head = gitlayer.head_commit(a.tree.repo)
    if head != applied.get("head_before") or not applied.get("head_after"):
        return None
    paths = sorted(set(applied.get("files", {})) | set(applied.get("overlay", {})))
    move_head(a, head, applied["head_after"], paths, "finish an interrupted apply --commit")
    return f"moved HEAD to the series' last commit {applied['head_after'][:12]} (interrupted run)"
