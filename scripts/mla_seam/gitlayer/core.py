"""Pinned git configuration and environment, the git command, opening and initializing
repositories, hashing and applying patches, and the commits mla-seam makes.

Flags are pinned and commented so that the same inputs give the same bytes on any machine,
whatever the user's ``~/.gitconfig`` says. Callers never build git command lines themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import git
from mla_seam.errors import GitError

# Configuration forced on every git process we start. Each entry neutralizes a user or system
# setting that would change bytes we read or write.
PINNED_CONFIG: Sequence[str] = (
    "core.autocrlf=false",  # never rewrite line endings on read or write
    "core.safecrlf=false",  # no CRLF warnings turning into errors
    "core.quotepath=false",  # paths printed verbatim (spaces, UTF-8), not C-quoted
    "core.fileMode=true",  # the executable bit is content we track
    "diff.noprefix=false",  # always a/ and b/ prefixes, so -p1 is right
    "diff.mnemonicPrefix=false",  # ... and never i/ w/ c/ prefixes
    "diff.renames=false",  # a rename is a delete + add: explicit, reversible
    "diff.algorithm=myers",  # the default algorithm, pinned: hunks stay byte-stable
    "diff.context=3",  # three context lines, like upstream's own patches
    "diff.interHunkContext=0",  # hunks are not merged on the user's preference
    "diff.suppressBlankEmpty=false",  # a blank context line keeps its leading space
    "format.signature=",  # no "-- 2.x.y" trailer carrying the git version
    "format.numbered=auto",  # [PATCH n/m] only for multi-patch ranges (we pass -N anyway)
    "format.coverLetter=false",
    "format.useAutoBase=false",  # no base-commit trailer that depends on local refs
    "format.thread=false",
    "format.headers=",
    "commit.gpgSign=false",  # signing would make commits machine-dependent
    "tag.gpgSign=false",
    "init.defaultBranch=main",
    "advice.detachedHead=false",
    "apply.whitespace=nowarn",  # upstream context may carry trailing blanks; never "fix" them
    "user.useConfigOnly=false",
)

# Environment for every git process: no prompts, no system config, C locale for parsable output.
PINNED_ENV: Mapping[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "LC_ALL": "C",
    "LANG": "C",
}

# Author/committer used for commits we make (materialized releases, series exports): fixed so
# that commit ids, and with them format-patch output, are reproducible.
SEAM_IDENT = {"name": "mla-seam", "email": "mla-seam@users.noreply.github.com"}


def _literal(cmd: git.Git, path: Optional[os.PathLike]) -> git.Git:
    """Give ``cmd`` the literal working directory ``path``.

    GitPython expands ``$VARS`` and ``~`` in the working directory it is given; a folder named
    ``$HOME`` would then be read as the user's home. mla-seam takes paths literally.
    """
    if path is not None:
        cmd._working_dir = os.path.normpath(  # pylint: disable=protected-access
            os.path.abspath(os.fspath(path))
        )
    return cmd


def _pin(cmd: git.Git) -> git.Git:
    cmd.set_persistent_git_options(c=list(PINNED_CONFIG))
    cmd.update_environment(**PINNED_ENV)
    return cmd


def argv(*args: str) -> List[str]:
    """A full ``git`` command line with the pinned ``-c`` settings, for ``Git.execute``.

    ``execute`` bypasses GitPython's persistent options, so every raw call builds its command
    line here instead of spelling ``["git", ...]`` itself.
    """
    pinned = [item for setting in PINNED_CONFIG for item in ("-c", setting)]
    return ["git", *pinned, *args]


def command(cwd: Optional[os.PathLike] = None) -> git.Git:
    """A pinned git command runner for ``cwd`` (which need not be a repository)."""
    return _pin(_literal(git.Git(), cwd))


def user_command(repo: git.Repo) -> git.Git:
    """A runner for ``repo`` that keeps the user's own configuration (no ``-c`` pins).

    For questions about the user's work tree whose answer depends on that configuration: what
    counts as changed (``core.autocrlf``, ``core.fileMode``, filters) and how a file is stored.
    """
    cmd = _literal(git.Git(), repo.working_tree_dir)
    cmd.update_environment(**PINNED_ENV)
    cmd.set_persistent_git_options(c=["core.quotepath=false"])
    return cmd


def open_repo(path: os.PathLike) -> Optional[git.Repo]:
    """Open the repository whose work tree top level is ``path``; ``None`` if there is none.

    A directory nested inside some other repository (say site-packages inside a checkout) is
    not treated as that repository: only a work tree rooted exactly at ``path`` counts. The path
    is taken literally (``expand_vars=False``): a folder named ``$HOME`` is that folder.

    Raises:
        GitError: ``path/.git`` exists but is no usable repository (a ``.git`` file pointing to
            a git dir that is gone, a damaged ``.git`` folder).
    """
    try:
        repo = git.Repo(str(path), search_parent_directories=True, expand_vars=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        dot_git = Path(path) / ".git"
        if os.path.lexists(dot_git):
            raise _broken_dot_git(dot_git, exc) from None
        return None
    if repo.working_tree_dir is None:
        return None
    if Path(repo.working_tree_dir).resolve() != Path(path).resolve():
        if os.path.lexists(Path(path) / ".git"):
            raise _broken_dot_git(Path(path) / ".git", None)
        return None
    _pin(_literal(repo.git, repo.working_tree_dir))
    return repo


def _broken_dot_git(dot_git: Path, exc: Optional[Exception]) -> GitError:
    target = ""
    if dot_git.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            target = dot_git.read_text(encoding="utf-8").strip()
    what = f"a .git file saying {target!r}" if target else "a .git entry git cannot open"
    return GitError(
        f"{dot_git.parent} has {what}: it is not a usable git work tree"
        + (f" ({type(exc).__name__})" if exc else ""),
        "repair it (git worktree prune / repair in the main checkout, or fix the gitdir line), "
        "or remove the .git entry to treat the folder as a plain tree",
    )


def init_repo(path: os.PathLike) -> git.Repo:
    """``git init`` a new repository at ``path`` with the pinned configuration."""
    repo = git.Repo.init(str(path), initial_branch="main", expand_vars=False)
    _pin(_literal(repo.git, repo.working_tree_dir))
    return repo


def git_dir(repo: git.Repo) -> Path:
    """The repository's private folder (``.git``, or the worktree's gitdir)."""
    return Path(repo.git.rev_parse("--absolute-git-dir"))


def hash_blobs(root: os.PathLike, relpaths: Iterable[str]) -> Dict[str, Optional[str]]:
    """Git blob ids of files under ``root`` (``None`` for a path that does not exist).

    The ids of the raw bytes (``git hash-object --no-filters``: no clean filter or CRLF
    conversion), so the id is the same in a git checkout and in a plain folder such as
    site-packages; computed in-process (:func:`blob_id`), no repository needed.
    """
    result: Dict[str, Optional[str]] = {}
    for rel in relpaths:
        path = Path(root) / rel
        try:
            result[rel] = blob_id(path.read_bytes()) if path.is_file() else None
        except (FileNotFoundError, NotADirectoryError):
            result[rel] = None
    return result


def blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (``git hash-object --no-filters``), computed in-process.

    SHA-1, the object format of every repository mla-seam records blobs for; cheap enough to
    verify every byte mla-seam writes back."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def apply_patch(
    workdir: os.PathLike,
    patch: Union[os.PathLike, Sequence[os.PathLike]],
    *,
    check: bool = False,
    reverse: bool = False,
    three_way: bool = False,
) -> str:
    """Apply one patch file (or several, in order, as one all-or-nothing step) under ``workdir``.

    Several patches may touch the same file: each applies to the result of the ones before it.

    The report names each hunk that landed at an offset ("Hunk #2 succeeded at 120 (offset 4
    lines)"). Raises ``git.GitCommandError`` when any hunk does not apply; nothing is written in
    that case (git apply is all-or-nothing per invocation).
    """
    args: List[str] = [
        "--verbose",  # report offsets per hunk
        "-p1",  # a/ b/ prefixes, as format-patch writes them
        "--whitespace=nowarn",  # context is matched byte for byte; never rewrite blanks
        # No -C<n>: git apply's default demands every context line (no fuzz, unlike patch(1)).
    ]
    if check:
        args.append("--check")
    if reverse:
        args.append("--reverse")
    if three_way:
        args.append("--3way")  # only meaningful inside a repository that has the pre-image blobs
    patches = [patch] if isinstance(patch, (str, os.PathLike)) else list(patch)
    args += ["--", *(str(Path(p).resolve()) for p in patches)]
    cmd = command(workdir)
    # Outside a repository git apply treats cwd as the tree; GIT_DIR unset keeps it from
    # discovering an enclosing repository when the scratch folder happens to live inside one.
    env = {"GIT_CEILING_DIRECTORIES": str(Path(workdir).resolve().parent)}
    status, out, err = cmd.execute(
        argv("apply", *args), with_extended_output=True, with_exceptions=False, env=env
    )
    if status != 0:
        raise git.GitCommandError(["git", "apply", *args], status, err, out)
    return "\n".join(s for s in (out, err) if s)


def dirty_paths(repo: git.Repo, relpaths: Iterable[str]) -> List[str]:
    """The subset of ``relpaths`` with uncommitted changes (staged, unstaged or untracked)."""
    relpaths = list(relpaths)
    if not relpaths:
        return []
    # The user's own configuration decides what "changed" means (core.autocrlf, core.fileMode,
    # filters): a clean checkout made with core.autocrlf=true is clean. No -c pins here.
    cmd = user_command(repo)
    cmd.update_environment(GIT_OPTIONAL_LOCKS="0")  # a look only: never take the index's lock
    out = cmd.status(
        "--porcelain=v1",  # stable, script-oriented format
        "-z",  # NUL-separated: paths with spaces or newlines stay intact
        "--untracked-files=all",
        "--ignored=no",
        "--",
        *relpaths,
    )
    dirty = []
    for entry in out.split("\0"):
        if len(entry) > 3:
            dirty.append(entry[3:])
    return dirty


def head_blob(repo: git.Repo, relpath: str) -> Optional[str]:
    """Blob id of ``relpath`` in HEAD, or ``None`` when HEAD lacks it (or there is no HEAD)."""
    try:
        return repo.git.rev_parse(f"HEAD:{relpath}")
    except git.GitCommandError:
        return None


def commit_all(repo: git.Repo, message: str, date: str) -> str:
    """Stage everything and commit with the fixed mla-seam identity at ``date``; return the id.

    ``date`` is an ISO-8601 timestamp; with the fixed identity it makes the commit id depend only
    on content, so materialized releases and exported patches are reproducible.
    """
    repo.git.add("--all", "--force")  # --force: a release's files are content even if ignored
    env = {
        "GIT_AUTHOR_NAME": SEAM_IDENT["name"],
        "GIT_AUTHOR_EMAIL": SEAM_IDENT["email"],
        "GIT_COMMITTER_NAME": SEAM_IDENT["name"],
        "GIT_COMMITTER_EMAIL": SEAM_IDENT["email"],
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_DATE": date,
    }
    repo.git.execute(
        argv("commit", "--quiet", "--no-verify", "--allow-empty", "--no-gpg-sign", "-m", message),
        env=env,
    )
    return repo.head.commit.hexsha


def format_patch(repo: git.Repo, rev_range: str, outdir: os.PathLike) -> List[Path]:
    """Export ``rev_range`` as mailbox patches into ``outdir``, byte-stable; return the paths."""
    out = repo.git.format_patch(
        "--zero-commit",  # "From 000..." instead of the commit id: ids change on every rebase
        "--no-signature",  # no git version trailer
        "--no-stat",  # diffstat widths depend on terminal/locale; the manifest lists files
        "--full-index",  # full blob ids on "index" lines: pre-images verifiable from the patch
        "--no-renames",  # renames as delete+add, matching diff.renames=false
        "--no-binary",  # we never ship binary hunks; fail loudly if one appears
        "--no-color",
        "--abbrev=40",
        "--encoding=UTF-8",
        "-N",  # no [PATCH n/m] numbering in subjects: inserting a patch must not touch others
        "--subject-prefix=PATCH",
        "-o",
        str(outdir),
        rev_range,
    )
    return [Path(line) for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def stdin_file(data: bytes) -> Iterator[IO[bytes]]:
    """A real file holding ``data`` for a git process's stdin (GitPython needs a file number)."""
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        handle.seek(0)
        yield handle
