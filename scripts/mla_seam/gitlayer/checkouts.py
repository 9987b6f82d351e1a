"""Upstream checkouts (clone, tags, fetch) and the tree reads of the apply engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import git
from mla_seam.gitlayer.core import PINNED_CONFIG, command, open_repo

# --- upstream checkouts ---
# Used by mla_seam.upstream to build, clone and combine release checkouts.

# Seconds a network clone may take before it is killed (a hung mirror must not hang the CLI).
CLONE_TIMEOUT_S = 900


def clone_tag(url: str, tag: str, dest: os.PathLike, timeout: int = CLONE_TIMEOUT_S) -> git.Repo:
    """Shallow-clone ``url`` at ``tag`` into ``dest`` (HEAD detached at the tag).

    Raises ``git.GitCommandError`` when the URL is unreachable or has no such tag. The tag ref
    itself is created locally when the clone did not bring it along.
    """
    # ``execute`` does not add the persistent ``-c`` options: pass them here, so the checkout
    # that clone writes is not converted by the user's core.autocrlf and the like.
    pins = [arg for setting in PINNED_CONFIG for arg in ("-c", setting)]
    args = [
        "git",
        *pins,
        "clone",
        "--quiet",
        "--depth=1",  # one release's tree is all we need; history stays upstream
        "--single-branch",
        "--no-tags",  # only the one tag, created below
        f"--branch={tag}",
        "--",
        url,
        str(dest),
    ]
    command().execute(args, kill_after_timeout=timeout)
    repo = open_repo(dest)
    if repo is None:
        raise git.GitCommandError(args, 1, f"no work tree at {dest} after clone")
    if tag_commit(repo, tag) is None:
        create_tag(repo, tag, "HEAD")
    return repo


def create_tag(repo: git.Repo, name: str, rev: str = "HEAD") -> None:
    """Create the lightweight tag ``name`` at ``rev`` (no tagger, so nothing machine-dependent)."""
    repo.git.tag(name, rev)  # lightweight: never signed, no tagger line


def set_branch(repo: git.Repo, name: str, rev: str) -> None:
    """Point the local branch ``name`` at ``rev`` (created or moved; nothing checked out)."""
    repo.git.branch("--force", "--no-track", name, rev)


def tag_commit(repo: git.Repo, tag: str) -> Optional[str]:
    """The commit id ``tag`` points at, or ``None`` when the repository has no such tag."""
    status, out, _ = repo.git.execute(
        ["git", "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}^{{commit}}"],
        with_extended_output=True,
        with_exceptions=False,
    )
    return out.strip() if status == 0 and out.strip() else None


def head_commit(repo: git.Repo) -> Optional[str]:
    """The commit id of HEAD, or ``None`` in a repository without commits."""
    status, out, _ = repo.git.execute(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
        with_extended_output=True,
        with_exceptions=False,
    )
    return out.strip() if status == 0 and out.strip() else None


def fetch_tags(repo: git.Repo, source: os.PathLike, tags: Sequence[str]) -> None:
    """Copy ``tags`` (and their objects) from the repository at ``source`` into ``repo``.

    A fetch transfers objects as a pack into ``repo``'s own object store: nothing is shared with
    ``source`` (no hardlinks, no alternates), so later writes in ``repo`` never reach it.
    """
    refspecs = [f"refs/tags/{t}:refs/tags/{t}" for t in tags]
    repo.git.fetch(
        "--quiet",
        "--no-tags",
        "--update-shallow",  # a shallow source (a --depth 1 clone) would otherwise be refused
        "--",
        str(Path(source).resolve()),
        *refspecs,
    )


def checkout_branch(repo: git.Repo, branch: str, rev: str) -> None:
    """Point ``branch`` at ``rev`` (creating or resetting it) and check it out, overwriting."""
    repo.git.checkout("--quiet", "--force", "-B", branch, rev)


def tags_at(repo: git.Repo) -> Dict[str, str]:
    """Every tag of ``repo`` mapped to the commit it points at."""
    fmt = "--format=%(refname:strip=2) %(*objectname)%(objectname)"
    out = repo.git.execute(["git", "for-each-ref", fmt, "refs/tags"])
    result: Dict[str, str] = {}
    for line in out.splitlines():
        name, _, ids = line.partition(" ")
        # Annotated: "*objectname" (the commit) then "objectname" (the tag object); keep the first.
        result[name] = ids[:40]
    return result


# --- apply engine ---


def tree_blobs(repo: git.Repo, ref: str, relpaths: Iterable[str]) -> Dict[str, Optional[str]]:
    """Blob ids of ``relpaths`` in the tree of ``ref`` (``None`` where ``ref`` lacks the path).

    One ``git ls-tree`` for all paths: ``-z`` keeps paths with spaces intact, ``--full-tree``
    makes the paths relative to the top level whatever the process's cwd is.
    """
    relpaths = list(relpaths)
    result: Dict[str, Optional[str]] = {p: None for p in relpaths}
    if not relpaths:
        return result
    out = repo.git.ls_tree("-r", "-z", "--full-tree", ref, "--", *relpaths)
    for entry in out.split("\0"):
        if not entry:
            continue
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 3 and parts[1] == "blob" and path in result:
            result[path] = parts[2]
    return result


def read_blob(repo: git.Repo, ref: str, relpath: str) -> bytes:
    """The exact bytes of ``relpath`` at ``ref`` (through the object database, no output munging).

    Raises ``KeyError`` when ``ref`` has no such file.
    """
    tree = repo.commit(ref).tree
    return tree[relpath].data_stream.read()


# Settings that change a commit's bytes, written into a repository's own config before
# ``commit_all``: ``commit_all`` runs ``git commit`` through ``execute``, which does not carry the
# persistent ``-c`` options, so without these a user's ``commit.gpgSign=true`` or
# ``i18n.commitEncoding`` would sign the commit or add an encoding header (a different id).
LOCAL_COMMIT_CONFIG: Sequence[str] = (
    *PINNED_CONFIG,
    "i18n.commitEncoding=UTF-8",  # UTF-8 is the default: no "encoding" header in the commit
)


def pin_local_config(repo: git.Repo, settings: Sequence[str] = LOCAL_COMMIT_CONFIG) -> None:
    """Write ``settings`` (``key=value``) into ``repo``'s local config, overriding user config."""
    for setting in settings:
        key, _, value = setting.partition("=")
        repo.git.config("--local", key, value)
