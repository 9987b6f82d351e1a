"""Rebase and drift: scratch clones, replayed mailbox patches, history queries and range-diff."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import git
from mla_seam.gitlayer.core import argv, command, open_repo, stdin_file

# --- rebase/drift ---
# Used by mla_seam.rebase and mla_seam.drift: scratch clones, commits replayed from mailbox
# patches, history queries (blame, pickaxe, patch-id) and range-diff.


def clone_shared(source: os.PathLike, dest: os.PathLike) -> git.Repo:
    """A scratch clone of the repository at ``source`` that borrows its objects.

    ``git clone --shared --no-checkout``: the clone reads ``source``'s object store through an
    alternates file and writes its own objects (commits we make) into ``dest`` only, so the
    user's repository is never written. Tags and branches come along (branches as ``origin/*``).
    """
    command().execute(
        argv("clone", "--quiet", "--shared", "--no-checkout", "--", str(source), str(dest))
    )
    repo = open_repo(dest)
    if repo is None:
        raise git.GitCommandError(["git", "clone"], 1, f"no work tree at {dest} after clone")
    # No pin_local_config here: the -c pins already apply to every command, and pinning
    # format.headers in the local config as well would add a second empty header line.
    return repo


def resolve_commit(repo: git.Repo, rev: str) -> Optional[str]:
    """The commit id ``rev`` names in ``repo`` (tag, branch, id), or ``None``."""
    status, out, _ = repo.git.execute(
        argv("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"),
        with_extended_output=True,
        with_exceptions=False,
    )
    return out.strip() if status == 0 and out.strip() else None


def checkout_detached(repo: git.Repo, rev: str) -> None:
    """Check ``rev`` out with a detached HEAD, overwriting the work tree."""
    repo.git.checkout("--quiet", "--force", "--detach", rev)


def reset_hard(repo: git.Repo, rev: str = "HEAD") -> None:
    """Discard index and work-tree changes (a failed 3-way merge) back to ``rev``."""
    repo.git.reset("--quiet", "--hard", rev)


def is_ancestor(repo: git.Repo, ancestor: str, descendant: str) -> bool:
    """Whether ``ancestor`` is reachable from ``descendant`` (``git merge-base --is-ancestor``)."""
    status, _, _ = repo.git.execute(
        argv("merge-base", "--is-ancestor", ancestor, descendant),
        with_extended_output=True,
        with_exceptions=False,
    )
    return status == 0


def mailinfo(patch: bytes, cwd: os.PathLike) -> Dict[str, str]:
    """Split a format-patch mail into ``author``, ``email``, ``date``, ``subject``, ``body``, ``diff``.

    ``git mailinfo -b`` strips only the ``[PATCH]`` prefix of the subject; ``body`` is the commit
    message after the subject, byte for byte, so a commit made with ``subject\\n\\nbody``
    (``--cleanup=verbatim``) exports to the same mail again.
    """
    with tempfile.TemporaryDirectory(prefix="mla-seam-mail-") as tmp:
        msg, diff = Path(tmp) / "msg", Path(tmp) / "diff"
        with stdin_file(patch) as stdin:
            out = command(cwd).execute(argv("mailinfo", "-b", str(msg), str(diff)), istream=stdin)
        info = {"body": msg.read_text(encoding="utf-8"), "diff": diff.read_text(encoding="utf-8")}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key in ("Author", "Email", "Subject", "Date"):
            info[key.lower()] = value
    return info


def apply_index(
    workdir: os.PathLike, patch: os.PathLike, *, three_way: bool = False
) -> Tuple[bool, str]:
    """``git apply --index`` (``--3way`` too when asked) in the repository at ``workdir``.

    Returns ``(ok, report)``; on failure nothing is applied, except that a 3-way merge with
    conflicts leaves conflict markers and unmerged index entries (undo with :func:`reset_hard`).
    """
    args = ["--verbose", "-p1", "--whitespace=nowarn", "--index"]
    if three_way:
        args.append("--3way")
    patches = [patch] if isinstance(patch, (str, os.PathLike)) else list(patch)
    args += ["--", *(str(Path(p).resolve()) for p in patches)]
    status, out, err = command(workdir).execute(
        argv("apply", *args), with_extended_output=True, with_exceptions=False
    )
    return status == 0, "\n".join(s for s in (out, err) if s)


def commit_replayed(repo: git.Repo, message: str, name: str, email: str, date: str) -> str:
    """Commit the index with ``message`` kept verbatim, authored and committed as given.

    Committer and author are the same person at the same date, so the commit id depends only on
    the content and the patch it came from (range-diff output is reproducible).
    """
    env = {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_DATE": date,
    }
    with stdin_file(message.encode("utf-8")) as stdin:
        repo.git.execute(
            argv(
                "commit", "--quiet", "--no-verify", "--allow-empty", "--cleanup=verbatim", "-F", "-"
            ),
            env=env,
            istream=stdin,
        )
    return repo.head.commit.hexsha


def patch_id(diff: bytes, cwd: os.PathLike) -> Optional[str]:
    """``git patch-id --stable`` of a diff (``None`` when it has no hunks)."""
    with stdin_file(diff) as stdin:
        out = command(cwd).execute(argv("patch-id", "--stable"), istream=stdin)
    return out.split()[0] if out.strip() else None


def commit_patch_ids(
    repo: git.Repo, rev_range: str, paths: Sequence[str], limit: int = 2000
) -> Dict[str, str]:
    """``patch-id -> commit`` for the (at most ``limit``) commits of ``rev_range`` touching ``paths``."""
    log = repo.git.execute(
        argv(
            "log",
            "--no-color",
            "-p",
            "--no-merges",
            f"--max-count={limit}",
            "--format=commit %H",
            rev_range,
            "--",
            *paths,
        ),
        strip_newline_in_stdout=False,
    )
    if not log.strip():
        return {}
    with stdin_file(log.encode("utf-8", "surrogateescape")) as stdin:
        out = repo.git.execute(argv("patch-id", "--stable"), istream=stdin)
    ids: Dict[str, str] = {}
    for line in out.splitlines():
        pid, _, commit = line.partition(" ")
        ids.setdefault(pid, commit)
    return ids


def log_touching(
    repo: git.Repo, rev_range: str, paths: Sequence[str], limit: int = 50, needle: str = ""
) -> List[Tuple[str, str]]:
    """``(commit, subject)`` of commits in ``rev_range`` touching ``paths``, newest first.

    With ``needle``, only commits that change the number of occurrences of that text
    (``git log -S``, the pickaxe): the commits that added or removed a line.
    """
    args = ["log", "--no-color", f"--max-count={limit}", "--format=%H%x09%s"]
    if needle:
        args.append(f"-S{needle}")
    out = repo.git.execute(argv(*args, rev_range, "--", *paths))
    rows = []
    for line in out.splitlines():
        commit, _, subject = line.partition("\t")
        rows.append((commit, subject))
    return rows


def blame_reverse(
    repo: git.Repo, start: str, end: str, path: str, first: int, last: int
) -> List[str]:
    """For lines ``first..last`` of ``path`` at ``start``: the last commit up to ``end`` that has each.

    ``git blame --reverse start..end``: a line whose commit is not ``end`` was changed or removed
    by a child of that commit. ``start`` must be an ancestor of ``end``.
    """
    out = repo.git.execute(
        argv(
            "blame", "--reverse", "--porcelain", f"-L{first},{last}", f"{start}..{end}", "--", path
        )
    )
    commits = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and len(parts[0]) == 40 and parts[1].isdigit() and parts[2].isdigit():
            commits.append(parts[0])
    return commits


def first_descendant_touching(
    repo: git.Repo, commit: str, end: str, path: str
) -> Optional[Tuple[str, str]]:
    """The oldest commit between ``commit`` and ``end`` (ancestry path) that changes ``path``."""
    out = repo.git.execute(
        argv(
            "log",
            "--no-color",
            "--reverse",
            "--ancestry-path",
            "--format=%H%x09%s",
            f"{commit}..{end}",
            "--",
            path,
        )
    )
    for line in out.splitlines():
        sha, _, subject = line.partition("\t")
        return sha, subject
    return None


def commit_subject(repo: git.Repo, rev: str) -> str:
    """The subject line of ``rev``."""
    return repo.git.execute(argv("log", "-1", "--no-color", "--format=%s", rev)).strip()


def commit_message(repo: git.Repo, rev: str) -> str:
    """The full message of ``rev``."""
    return repo.git.execute(argv("log", "-1", "--no-color", "--format=%B", rev))


def rev_list(repo: git.Repo, rev_range: str) -> List[str]:
    """Commits of ``rev_range``, oldest first, first parents only."""
    out = repo.git.execute(argv("rev-list", "--reverse", "--first-parent", rev_range))
    return [line.strip() for line in out.splitlines() if line.strip()]


def changed_paths(repo: git.Repo, rev: str) -> List[Tuple[str, str]]:
    """``(status letter, path)`` of every file ``rev`` changes against its first parent."""
    out = repo.git.execute(
        argv("diff-tree", "--no-commit-id", "--name-status", "-r", "--no-renames", f"{rev}^", rev)
    )
    rows = []
    for line in out.splitlines():
        status, _, path = line.partition("\t")
        rows.append((status, path))
    return rows


def range_diff(repo: git.Repo, old_range: str, new_range: str) -> str:
    """``git range-diff`` of two commit ranges, without colour (the old vs new series)."""
    return repo.git.execute(
        argv("range-diff", "--no-color", "--creation-factor=95", old_range, new_range)
    )


def modified_tracked(repo: git.Repo, under: str = ".") -> List[str]:
    """Tracked files under ``under`` with staged or unstaged changes (untracked files ignored)."""
    out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=no", "--", under)
    return [entry[3:] for entry in out.split("\0") if len(entry) > 3]
