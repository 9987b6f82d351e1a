"""The one thin git layer of mla-seam: every git operation goes through GitPython here.

Flags are pinned and commented so that the same inputs give the same bytes on any machine,
whatever the user's ``~/.gitconfig`` says. Callers never build git command lines themselves.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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

    ``--no-filters`` hashes the raw bytes: no clean filter or CRLF conversion applies, so the
    id is the same in a git checkout and in a plain folder such as site-packages.
    """
    relpaths = list(relpaths)
    present = [p for p in relpaths if (Path(root) / p).is_file()]
    result: Dict[str, Optional[str]] = {p: None for p in relpaths}
    if present:
        # GIT_DIR: hash-object without -w needs no repository; a broken one in root must not
        # stop it.
        cmd = command(root)
        cmd.update_environment(GIT_DIR=os.devnull)
        out = cmd.hash_object("--no-filters", "--", *present)
        for rel, blob in zip(present, out.splitlines()):
            result[rel] = blob.strip()
    return result


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
    out = user_command(repo).status(
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


# --- upstream checkouts ---
# Used by mla_seam.upstream to build, clone and combine release checkouts. Appended section:
# the functions above are unchanged.

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


# --- rebase/drift ---
# Used by mla_seam.rebase and mla_seam.drift: scratch clones, commits replayed from mailbox
# patches, history queries (blame, pickaxe, patch-id) and range-diff. Appended section: the
# functions above are unchanged.


@contextlib.contextmanager
def _stdin(data: bytes) -> Iterator[IO[bytes]]:
    """A real file holding ``data`` for a git process's stdin (GitPython needs a file number)."""
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        handle.seek(0)
        yield handle


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
        with _stdin(patch) as stdin:
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
    with _stdin(message.encode("utf-8")) as stdin:
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
    with _stdin(diff) as stdin:
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
    with _stdin(log.encode("utf-8", "surrogateescape")) as stdin:
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
    with _stdin(data) as stdin:
        out = user_command(repo).execute(["git", *args], istream=stdin)
    return out.strip()


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
        with _stdin(("\n".join(lines) + "\n").encode("utf-8")) as stdin:
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
    with _stdin(message.encode("utf-8")) as stdin:
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
