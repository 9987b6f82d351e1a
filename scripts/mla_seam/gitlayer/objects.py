"""Apply engine on forks: filtered and pristine blobs, trees and commits of commit mode."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import git
from mla_seam.gitlayer.core import argv, command, init_repo, stdin_file, user_command

# --- apply engine: forks, pristine bytes, commit mode ---
# Used by mla_seam.apply, mla_seam.forks and mla_seam.commitmode.


def filtered_blobs(repo: git.Repo, relpaths: Iterable[str]) -> Dict[str, Optional[str]]:
    """Blob ids the files would get if committed now (the repository's clean filters and
    ``core.autocrlf`` applied); ``None`` for a path that does not exist. Nothing is written."""
    relpaths = list(relpaths)
    root = Path(repo.working_tree_dir or ".")
    present = [p for p in relpaths if (root / p).is_file()]
    result: Dict[str, Optional[str]] = {p: None for p in relpaths}
    if present:
        out = user_command(repo).hash_object("--", *present)
        for rel, blob in zip(present, out.splitlines()):
            result[rel] = blob.strip()
    return result


def store_blob(repo: git.Repo, data: bytes, path: Optional[str] = None) -> str:
    """Write ``data`` into ``repo``'s object store (clean filters for ``path`` applied when one is
    given, the raw bytes otherwise); return its id."""
    args = ["hash-object", "-w", "--stdin"]
    args += [f"--path={path}"] if path else ["--no-filters"]
    with stdin_file(data) as stdin:
        out = user_command(repo).execute(["git", *args], istream=stdin)
    return out.strip()


def store_blobs(repo: git.Repo, contents: Sequence[bytes]) -> List[str]:
    """Write raw ``contents`` into ``repo``'s object store in one ``hash-object -w``; return
    their ids, in order."""
    if not contents:
        return []
    with tempfile.TemporaryDirectory(prefix="mla-seam-blobs-") as tmp:
        names = []
        for k, data in enumerate(contents):
            (Path(tmp) / str(k)).write_bytes(data)
            names.append(str(Path(tmp) / str(k)))
        with stdin_file(("\n".join(names) + "\n").encode()) as stdin:
            out = user_command(repo).execute(
                ["git", "hash-object", "-w", "--no-filters", "--stdin-paths"], istream=stdin
            )
    return [line.strip() for line in out.splitlines()]


def blob_bytes(repo: git.Repo, blob: str) -> Optional[bytes]:
    """The raw bytes of ``blob`` in ``repo``'s object store, or ``None`` when it lacks it."""
    status, _, _ = repo.git.execute(
        argv("cat-file", "-e", f"{blob}^{{blob}}"), with_extended_output=True, with_exceptions=False
    )
    if status != 0:
        return None
    return repo.odb.stream(bytes.fromhex(blob)).read()


def smudged(repo: git.Repo, blob: str, path: str) -> bytes:
    """The work-tree bytes git would check ``blob`` out as at ``path`` (smudge filters and
    ``core.autocrlf`` of the repository applied)."""
    proc = user_command(repo).execute(
        ["git", "cat-file", "--filters", f"--path={path}", blob],
        stdout_as_string=False,
        strip_newline_in_stdout=False,
    )
    return proc if isinstance(proc, bytes) else proc.encode()


def objects_dir(repo: git.Repo) -> Path:
    """The repository's object store folder (for a scratch repository's alternates)."""
    return (Path(repo.common_dir) / "objects").resolve()  # shared by every work tree


def last_commit_with_blob(repo: git.Repo, relpath: str, blob: str) -> Optional[str]:
    """The newest commit reachable from HEAD that added or removed ``blob`` at ``relpath``.

    For a fork whose file left a release's content, that is the fork's first commit changing it
    (``None``: the blob is not in HEAD's history at that path).
    """
    out = repo.git.execute(
        argv("log", "-1", "--format=%H", f"--find-object={blob}", "HEAD", "--", relpath)
    )
    return out.strip() or None


def commits_touching_lines(
    repo: git.Repo, relpath: str, start: int, end: int, rev_range: str, limit: int = 20
) -> List[Tuple[str, str]]:
    """``(short id, subject)`` of the commits in ``rev_range`` that changed lines ``start..end``
    of ``relpath`` as HEAD has it (``git log -L``), newest first."""
    status, out, _ = repo.git.execute(
        argv(
            "log",
            f"-{limit}",
            "--no-patch",
            "--format=%h %s",
            f"-L{start},{end}:{relpath}",
            rev_range,
        ),
        with_extended_output=True,
        with_exceptions=False,
    )
    if status != 0:
        return []
    rows = []
    for line in out.splitlines():
        short, _, subject = line.partition(" ")
        if short:
            rows.append((short, subject))
    return rows


def scratch_repo(path: os.PathLike, alternate: Optional[git.Repo] = None) -> git.Repo:
    """A new repository at ``path`` that may read ``alternate``'s objects (never writes them)."""
    repo = init_repo(path)
    if alternate is not None:
        info = Path(repo.git_dir) / "objects" / "info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "alternates").write_text(f"{objects_dir(alternate)}\n", encoding="utf-8")
    return repo


def add_paths(repo: git.Repo, relpaths: Sequence[str]) -> None:
    """Stage ``relpaths`` exactly as they are (``git add --force``)."""
    repo.git.add("--force", "--", *relpaths)


def current_ident(repo: git.Repo, role: str = "COMMITTER") -> Optional[Tuple[str, str]]:
    """The user's ``(name, email)`` git would use as ``role`` in ``repo``, or ``None``."""
    status, out, _ = user_command(repo).execute(
        ["git", "var", f"GIT_{role}_IDENT"], with_extended_output=True, with_exceptions=False
    )
    if status != 0 or "<" not in out:
        return None
    name, _, rest = out.partition(" <")
    return name.strip(), rest.partition(">")[0]


def tree_with(repo: git.Repo, commit: str, files: Mapping[str, Optional[Tuple[str, str]]]) -> str:
    """The id of ``commit``'s tree with ``files`` replaced: ``path -> (mode, blob)``, or
    ``None`` to remove the path. Uses a temporary index; the user's index is never touched."""
    with tempfile.TemporaryDirectory(prefix="mla-seam-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        repo.git.execute(argv("read-tree", commit), env=env)
        lines = []
        for rel, entry in files.items():
            if entry is None:
                lines.append(f"0 {'0' * 40}\t{rel}")
            else:
                lines.append(f"{entry[0]} {entry[1]}\t{rel}")
        with stdin_file(("\n".join(lines) + "\n").encode("utf-8")) as stdin:
            repo.git.execute(argv("update-index", "--index-info"), env=env, istream=stdin)
        return repo.git.execute(argv("write-tree"), env=env).strip()


def commit_tree(
    repo: git.Repo,
    tree: str,
    parent: str,
    message: str,
    author: Tuple[str, str, str],
    committer: Tuple[str, str],
) -> str:
    """Create a commit object (no ref moves); ``author`` is ``(name, email, date)``."""
    env = {
        "GIT_AUTHOR_NAME": author[0],
        "GIT_AUTHOR_EMAIL": author[1],
        "GIT_AUTHOR_DATE": author[2],
        "GIT_COMMITTER_NAME": committer[0],
        "GIT_COMMITTER_EMAIL": committer[1],
    }
    with stdin_file(message.encode("utf-8")) as stdin:
        out = repo.git.execute(
            argv("commit-tree", "--no-gpg-sign", tree, "-p", parent, "-F", "-"),
            env=env,
            istream=stdin,
        )
    return out.strip()


def file_modes(repo: git.Repo, commit: str, relpaths: Iterable[str]) -> Dict[str, str]:
    """The git file mode (``100644``, ``100755``) of each path in ``commit`` that has one."""
    relpaths = list(relpaths)
    if not relpaths:
        return {}
    out = repo.git.ls_tree("-z", "--full-tree", commit, "--", *relpaths)
    modes = {}
    for entry in out.split("\0"):
        meta, _, path = entry.partition("\t")
        if path:
            modes[path] = meta.split()[0]
    return modes


def move_head(repo: git.Repo, new: str, old: str, reason: str) -> None:
    """Move HEAD (its branch, or HEAD itself when detached) from ``old`` to ``new`` atomically;
    fails when HEAD is no longer ``old``."""
    repo.git.execute(argv("update-ref", "-m", reason, "HEAD", new, old))


def reset_index(repo: git.Repo, rev: str, relpaths: Sequence[str]) -> None:
    """Set the index entries of ``relpaths`` to ``rev``'s (``git reset -q REV -- PATHS``); the
    work tree and every other index entry stay as they are."""
    repo.git.execute(argv("reset", "-q", rev, "--", *relpaths))


def head_commit_message(repo: git.Repo, rev: str) -> str:
    """The raw message of ``rev``."""
    return repo.git.execute(argv("log", "-1", "--format=%B", rev))


def head_ref(repo: git.Repo) -> Optional[str]:
    """The ref HEAD points to (``refs/heads/main``), or ``None`` when HEAD is detached."""
    status, out, _ = repo.git.execute(
        argv("symbolic-ref", "-q", "HEAD"), with_extended_output=True, with_exceptions=False
    )
    return out.strip() if status == 0 and out.strip() else None


def held_locks(repo: git.Repo) -> List[Path]:
    """The lock files of ``repo`` that a commit-mode run needs and someone else holds: the
    index's, HEAD's, the checked-out branch's and ``packed-refs``'s (``*.lock`` files that git
    creates while it writes them and leaves behind when it crashes)."""
    private, common = Path(repo.git_dir), Path(repo.common_dir)
    candidates = [private / "index.lock", private / "HEAD.lock", common / "packed-refs.lock"]
    ref = head_ref(repo)
    if ref:
        candidates.append(common / f"{ref}.lock")
    return [path for path in candidates if os.path.lexists(path)]


def merge_file(
    ours: bytes, base: bytes, theirs: bytes, labels: Tuple[str, str, str]
) -> Tuple[bytes, int]:
    """Three-way merge of one file's contents (``git merge-file -p``; no repository needed).

    Returns the merged bytes (with conflict markers where both sides changed the same lines)
    and the number of conflicts (0: a clean merge).
    """
    with tempfile.TemporaryDirectory(prefix="mla-seam-merge-") as tmp:
        names = []
        for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
            (Path(tmp) / name).write_bytes(data)
            names.append(name)
        cmd = command(tmp)
        cmd.update_environment(GIT_DIR=os.devnull)  # no repository: never read one's config
        status, out, err = cmd.execute(
            argv("merge-file", "-p", *(x for label in labels for x in ("-L", label)), *names),
            with_extended_output=True,
            with_exceptions=False,
            stdout_as_string=False,
            strip_newline_in_stdout=False,
        )
    if status < 0 or status > 127:
        raise git.GitCommandError(["git", "merge-file"], status, err, "")
    return (out if isinstance(out, bytes) else out.encode()), status


class TreeBuilder:
    """Trees made one after the other from a commit's tree with some paths changed, in one
    temporary index (``read-tree`` once, then ``update-index`` and ``write-tree`` per tree); the
    user's index is never touched. A context manager."""

    def __init__(self, repo: git.Repo, commit: str) -> None:
        self.repo = repo
        self._tmp = tempfile.TemporaryDirectory(prefix="mla-seam-index-")
        self.env = {"GIT_INDEX_FILE": str(Path(self._tmp.name) / "index")}
        repo.git.execute(argv("read-tree", commit), env=self.env)

    def tree(self, files: Mapping[str, Optional[Tuple[str, str]]]) -> str:
        """The tree of the last one with ``files`` replaced: ``path -> (mode, blob)``, or
        ``None`` to remove the path."""
        lines = [
            f"0 {'0' * 40}\t{rel}" if entry is None else f"{entry[0]} {entry[1]}\t{rel}"
            for rel, entry in files.items()
        ]
        with stdin_file(("\n".join(lines) + "\n").encode("utf-8")) as stdin:
            self.repo.git.execute(argv("update-index", "--index-info"), env=self.env, istream=stdin)
        return self.repo.git.execute(argv("write-tree"), env=self.env).strip()

    def __enter__(self) -> "TreeBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def tree_entries(repo: git.Repo, ref: str, relpaths: Iterable[str]) -> Dict[str, Tuple[str, str]]:
    """``path -> (mode, blob id)`` of the paths ``ref``'s tree has (one ``ls-tree``)."""
    relpaths = list(relpaths)
    if not relpaths:
        return {}
    out = repo.git.ls_tree("-r", "-z", "--full-tree", ref, "--", *relpaths)
    entries = {}
    for entry in out.split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if path and len(parts) == 3 and parts[1] == "blob":
            entries[path] = (parts[0], parts[2])
    return entries


def commit_subjects(repo: git.Repo, commits: Sequence[str]) -> Dict[str, str]:
    """``commit -> subject`` for each of ``commits`` (one ``git log --no-walk``)."""
    if not commits:
        return {}
    out = repo.git.execute(argv("log", "--no-walk=unsorted", "--no-color", "--format=%H%x09%s",
                                *commits))  # fmt: skip
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
