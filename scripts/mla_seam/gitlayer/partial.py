"""Partial, shallow and remote clones: what a clone lacks, fetching it, and pushing.

CI clones of upstream are often blobless (``--filter=blob:none``), treeless
(``--filter=tree:0``) or shallow (``--depth``). git fetches a partial clone's missing objects
one at a time on demand, from its promisor remote; a ``clone --shared`` scratch copy of it (where
rebase and drift work) has no promisor and cannot. The functions here let the survey say which
objects it needs, fetch them in one batch into the clone's own object store, and give a scratch
copy the clone's promisor as a safety net. Refs, index and work tree of the clone are never
touched by them.

The nightly job's remote operations live here too: fetching tags and branches, reading and
pushing refs of the project's own remote (never forced).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import git
from mla_seam.errors import GitError
from mla_seam.gitlayer.core import argv, command, stdin_file

#: The remote name a scratch copy gets for its source clone's promisor remote.
SCRATCH_PROMISOR = "mla-seam-promisor"


@dataclasses.dataclass(frozen=True)
class CloneShape:
    """What kind of clone a repository is."""

    filter: Optional[str]  # "blob:none", "tree:0", ... (None: not partial)
    promisor: Optional[str]  # the promisor remote's name
    url: Optional[str]  # its URL
    uploadpack: Optional[str]  # its remote.<name>.uploadpack, if set
    shallow: bool

    @property
    def partial(self) -> bool:
        """Whether objects may be missing (a promisor remote is configured)."""
        return self.promisor is not None

    @property
    def treeless(self) -> bool:
        """Whether trees may be missing too (``tree:<depth>`` filter)."""
        return bool(self.filter and self.filter.startswith("tree:"))

    @property
    def kind(self) -> str:
        """``full``, ``blobless``, ``treeless``, ``partial (<filter>)``, each maybe ``shallow``."""
        if not self.partial:
            base = "full"
        elif self.filter == "blob:none":
            base = "blobless"
        elif self.treeless:
            base = "treeless"
        else:
            base = f"partial ({self.filter or 'promisor'})"
        return f"shallow {base}" if self.shallow else base


def _config(repo: git.Repo, key: str) -> Optional[str]:
    status, out, _ = repo.git.execute(
        argv("config", "--get", key), with_extended_output=True, with_exceptions=False
    )
    return out.strip() if status == 0 and out.strip() else None


def _config_regexp(repo: git.Repo, pattern: str) -> List[Tuple[str, str]]:
    status, out, _ = repo.git.execute(
        argv("config", "--get-regexp", pattern), with_extended_output=True, with_exceptions=False
    )
    rows = []
    for line in out.splitlines() if status == 0 else []:
        key, _, value = line.partition(" ")
        rows.append((key, value))
    return rows


def _shallow_file(repo: git.Repo) -> Path:
    return Path(repo.common_dir).resolve() / "shallow"


def clone_shape(repo: git.Repo) -> CloneShape:
    """The clone's shape: promisor remote and filter (partial), shallow or not."""
    promisor = _config(repo, "extensions.partialclone")
    if promisor is None:
        for key, value in _config_regexp(repo, r"^remote\..*\.promisor$"):
            if value.lower() == "true":
                promisor = key[len("remote.") : -len(".promisor")]
                break
    shallow = _shallow_file(repo).is_file()
    if promisor is None:
        return CloneShape(None, None, None, None, shallow)
    return CloneShape(
        _config(repo, f"remote.{promisor}.partialclonefilter"),
        promisor,
        _config(repo, f"remote.{promisor}.url"),
        _config(repo, f"remote.{promisor}.uploadpack"),
        shallow,
    )


def borrow_promisor(scratch: git.Repo, shape: CloneShape) -> None:
    """Let ``scratch`` (a ``clone --shared`` of a partial clone) fetch what it still lacks from
    the clone's promisor remote, on demand, into its own object store."""
    if not shape.partial or not shape.url:
        return
    name = SCRATCH_PROMISOR
    scratch.git.execute(argv("config", "core.repositoryformatversion", "1"))
    scratch.git.execute(argv("config", "extensions.partialclone", name))
    scratch.git.execute(argv("config", f"remote.{name}.url", shape.url))
    scratch.git.execute(argv("config", f"remote.{name}.promisor", "true"))
    if shape.filter:
        scratch.git.execute(argv("config", f"remote.{name}.partialclonefilter", shape.filter))
    if shape.uploadpack:
        scratch.git.execute(argv("config", f"remote.{name}.uploadpack", shape.uploadpack))


# --- what a survey needs ------------------------------------------------------------------------


def present_objects(repo: git.Repo) -> Set[str]:
    """Ids of every object the repository (and its alternates) holds; never fetches."""
    out = repo.git.execute(
        argv("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", "--unordered")
    )
    return set(out.split())


def has_tree(repo: git.Repo, rev: str) -> bool:
    """Whether ``rev``'s root tree is in the object store (a treeless clone may lack it)."""
    status, out, _ = repo.git.execute(
        argv("rev-parse", "--verify", "--quiet", f"{rev}^{{tree}}"),
        with_extended_output=True,
        with_exceptions=False,
    )
    if status != 0 or not out.strip():
        return False
    return out.strip() in present_objects(repo)


def blobs_at(repo: git.Repo, rev: str, paths: Sequence[str]) -> Dict[str, str]:
    """``path -> blob id`` of ``paths`` at ``rev`` (paths ``rev`` lacks are left out); reads
    trees only."""
    if not paths:
        return {}
    out = repo.git.execute(argv("ls-tree", "-r", "-z", "--full-tree", rev, "--", *paths))
    found = {}
    for entry in out.split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 3 and parts[1] == "blob":
            found[path] = parts[2]
    return found


def blobs_in_range(repo: git.Repo, rev_range: str, paths: Sequence[str]) -> Set[str]:
    """Every blob id ``paths`` had before or after a change in ``rev_range`` (``git log --raw``:
    trees only): what ``log -p``, ``log -S`` and ``blame`` over the range will read."""
    out = repo.git.execute(
        argv(
            "log", "--no-color", "--format=", "--raw", "--no-abbrev", "--no-renames", "-m",
            rev_range, "--", *paths,
        )  # fmt: skip
    )
    zero = "0" * 40
    blobs = set()
    for line in out.splitlines():
        if line.startswith(":"):
            fields = line.split("\t", 1)[0].split()
            blobs.update(b for b in fields[2:4] if b != zero)
    return blobs


def missing(repo: git.Repo, oids: Iterable[str]) -> List[str]:
    """The ids of ``oids`` the object store lacks (sorted); never fetches."""
    wanted = set(oids)
    if not wanted:
        return []
    return sorted(wanted - present_objects(repo))


def fetch_objects(repo: git.Repo, shape: CloneShape, oids: Sequence[str]) -> None:
    """Fetch ``oids`` from the clone's promisor remote into its object store, in one batch.

    Raises:
        GitError: the promisor remote is unreachable or refused; the message says exactly what
            to fetch by hand.
    """
    if not oids:
        return
    args = [
        "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--recurse-submodules=no",
        f"--filter={shape.filter or 'blob:none'}", "--stdin", shape.promisor or "origin",
    ]  # fmt: skip
    cfg = ["-c", "fetch.negotiationAlgorithm=noop"]
    with stdin_file(("\n".join(oids) + "\n").encode()) as stdin:
        status, _, err = repo.git.execute(
            ["git", *cfg, *argv(*args)[1:]],
            istream=stdin,
            with_extended_output=True,
            with_exceptions=False,
        )
    if status != 0:
        raise missing_objects_error(repo, shape, oids, err)


def missing_objects_error(
    repo: git.Repo, shape: CloneShape, oids: Sequence[str], reason: str = ""
) -> GitError:
    """The exit-23 error for objects a partial clone lacks and could not fetch."""
    root = repo.working_tree_dir or repo.git_dir
    remote = shape.promisor or "origin"
    shown = " ".join(oids[:8])
    why = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    return GitError(
        f"{root} is a {shape.kind} clone and lacks {len(oids)} object(s) mla-seam needs; "
        f"fetching them from {remote} ({shape.url}) failed" + (f": {why[-1]}" if why else ""),
        f"fetch them when {remote} is reachable: git -C {root} fetch --no-tags --filter=blob:none "
        f"{remote} {shown}{' ...' if len(oids) > 8 else ''}; or make the clone whole: "
        f"git -C {root} config --unset remote.{remote}.partialclonefilter && "
        f"git -C {root} fetch --refetch {remote}",
    )


def fetch_trees(repo: git.Repo, shape: CloneShape, refs: Sequence[str]) -> None:
    """Turn a treeless clone blobless for ``refs``: fetch their commits' trees (no blobs).

    ``git fetch --refetch --filter=blob:none`` (git 2.36+) asks for every commit and tree of
    ``refs`` as a fresh blobless clone would; the filter is recorded so later fetches bring trees.

    Raises:
        GitError: the remote is unreachable (the message says what to run).
    """
    remote = shape.promisor or "origin"
    args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--refetch",
            "--filter=blob:none", remote, *refs]  # fmt: skip
    status, _, err = repo.git.execute(argv(*args), with_extended_output=True, with_exceptions=False)
    root = repo.working_tree_dir or repo.git_dir
    if status != 0:
        why = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
        raise GitError(
            f"{root} is a treeless clone; fetching the trees of {len(refs)} commit(s) from "
            f"{remote} failed" + (f": {why[-1]}" if why else ""),
            f"run: git -C {root} fetch --refetch --filter=blob:none {remote} (it becomes a "
            "blobless clone), or clone with --filter=blob:none",
        )
    repo.git.execute(argv("config", f"remote.{remote}.partialclonefilter", "blob:none"))


def is_shallow_boundary(repo: git.Repo, commit: str) -> bool:
    """Whether ``commit`` is a boundary commit of a shallow clone (its parents are cut off)."""
    shallow = _shallow_file(repo)
    if not shallow.is_file():
        return False
    return commit in shallow.read_text(encoding="utf-8").split()


def merge_base(repo: git.Repo, a: str, b: str) -> Optional[str]:
    """The best common ancestor of ``a`` and ``b`` (``None``: no shared history here)."""
    status, out, _ = repo.git.execute(
        argv("merge-base", a, b), with_extended_output=True, with_exceptions=False
    )
    return out.strip().splitlines()[0] if status == 0 and out.strip() else None


def is_root(repo: git.Repo, commit: str) -> bool:
    """Whether ``commit`` truly has no parent (a release materialized from an sdist), not merely
    a shallow clone's cut."""
    out = repo.git.execute(argv("rev-list", "--parents", "-n1", commit)).split()
    return len(out) == 1 and not is_shallow_boundary(repo, commit)


def last_change_date(repo: git.Repo, rev: str, paths: Sequence[str]) -> str:
    """``YYYY-MM-DD`` (committer date) of the newest commit up to ``rev`` touching ``paths``,
    else of ``rev`` itself. Reads commits and trees only."""
    out = repo.git.execute(argv("log", "-1", "--format=%cs", rev, "--", *paths)).strip()
    return out or repo.git.execute(argv("log", "-1", "--format=%cs", rev)).strip()


# --- remotes: upstream tags and branches, the project's own remote ------------------------------


def fetch_upstream(
    repo: git.Repo, remote: str, branches: Dict[str, str], unshallow: bool = False
) -> None:
    """Fetch every tag of ``remote`` and each ``branch -> local ref`` of ``branches``.

    A partial clone fetches commits and trees only (its filter); ``unshallow`` deepens a shallow
    clone to its whole history first (culprits need it).

    Raises:
        git.GitCommandError: the remote is unreachable.
    """
    if unshallow:
        repo.git.execute(argv("fetch", "--quiet", "--unshallow", remote))
    repo.git.execute(argv("fetch", "--quiet", "--tags", "--force", remote))
    if branches:
        specs = [f"+refs/heads/{b}:{ref}" for b, ref in branches.items()]
        repo.git.execute(argv("fetch", "--quiet", "--no-tags", remote, *specs))


def remote_url(repo: git.Repo, remote: str) -> Optional[str]:
    """``remote.<remote>.url``, or ``None``."""
    return _config(repo, f"remote.{remote}.url")


def ls_remote(repo: git.Repo, remote: str, refs: Sequence[str]) -> Dict[str, str]:
    """``ref -> commit`` of ``refs`` on ``remote`` (missing refs left out).

    Raises:
        git.GitCommandError: the remote is unreachable.
    """
    out = repo.git.execute(argv("ls-remote", "--refs", remote, *refs))
    found = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        found[ref.strip()] = sha.strip()
    return found


def fetch_ref(repo: git.Repo, remote: str, ref: str) -> Optional[str]:
    """Fetch ``ref`` of ``remote`` (its objects; no local ref moves); its commit, or ``None``
    when the remote has no such ref."""
    status, _, _ = repo.git.execute(
        argv("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote, f"{ref}"),
        with_extended_output=True,
        with_exceptions=False,
    )
    if status != 0:
        return None
    return ls_remote(repo, remote, [ref]).get(ref)


def push_ref(repo: git.Repo, remote: str, commit: str, ref: str) -> Tuple[bool, str]:
    """Push ``commit`` to ``ref`` of ``remote``, never forced (a fast-forward or a new ref).

    Returns:
        ``(pushed, git's message)``; ``False`` when the remote refused (someone else's commits
        are on the ref: it is not a fast-forward) or is unreachable.
    """
    status, out, err = repo.git.execute(
        argv("push", "--porcelain", remote, f"{commit}:{ref}"),
        with_extended_output=True,
        with_exceptions=False,
    )
    return status == 0, "\n".join(s for s in (out, err) if s).strip()


def read_file_at(repo: git.Repo, rev: str, relpath: str) -> Optional[bytes]:
    """The bytes of ``relpath`` at ``rev`` (``None`` when ``rev`` has no such file)."""
    status, out, _ = repo.git.execute(
        argv("cat-file", "blob", f"{rev}:{relpath}"),
        with_extended_output=True,
        with_exceptions=False,
        stdout_as_string=False,
        strip_newline_in_stdout=False,
    )
    return out if status == 0 else None


def files_under(repo: git.Repo, rev: str, folder: str) -> List[str]:
    """Paths of the files under ``folder`` at ``rev`` (``[]`` when there is none)."""
    status, out, _ = repo.git.execute(
        argv("ls-tree", "-r", "-z", "--name-only", "--full-tree", rev, "--", folder),
        with_extended_output=True,
        with_exceptions=False,
    )
    return [p for p in out.split("\0") if p] if status == 0 else []


def commit_files(
    repo: git.Repo,
    parent: Optional[str],
    files: Dict[str, Optional[bytes]],
    message: str,
    ident: Tuple[str, str],
    date: str,
) -> str:
    """A new commit: ``parent``'s tree with ``files`` written (``None`` removes the path).

    Plumbing only (objects, a temporary index): no ref moves, the work tree is not touched.
    """
    import tempfile  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="mla-seam-commit-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if parent:
            repo.git.execute(argv("read-tree", parent), env=env)
        lines = []
        for rel, data in sorted(files.items()):
            if data is None:
                lines.append(f"0 {'0' * 40}\t{rel}")
                continue
            with stdin_file(data) as stdin:
                blob = repo.git.execute(
                    argv("hash-object", "-w", "--no-filters", "--stdin"), istream=stdin
                ).strip()
            lines.append(f"100644 {blob}\t{rel}")
        with stdin_file(("\n".join(lines) + "\n").encode("utf-8")) as stdin:
            repo.git.execute(argv("update-index", "--index-info"), env=env, istream=stdin)
        tree = repo.git.execute(argv("write-tree"), env=env).strip()
    who = {
        "GIT_AUTHOR_NAME": ident[0],
        "GIT_AUTHOR_EMAIL": ident[1],
        "GIT_COMMITTER_NAME": ident[0],
        "GIT_COMMITTER_EMAIL": ident[1],
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_DATE": date,
    }
    args = ["commit-tree", "--no-gpg-sign", tree] + (["-p", parent] if parent else [])
    with stdin_file(message.encode("utf-8")) as stdin:
        return repo.git.execute(argv(*args, "-F", "-"), env=who, istream=stdin).strip()


def commit_author(repo: git.Repo, rev: str) -> Tuple[str, str]:
    """``(author email, full message)`` of ``rev``."""
    email = repo.git.execute(argv("log", "-1", "--format=%ae", rev)).strip()
    return email, repo.git.execute(argv("log", "-1", "--format=%B", rev))


def commits_between(repo: git.Repo, old: str, new: str) -> List[str]:
    """Commits of ``old..new``, oldest first."""
    out = repo.git.execute(argv("rev-list", "--reverse", f"{old}..{new}"))
    return [line for line in out.split() if line]


def sparse_checkout(repo: git.Repo, paths: Iterable[str]) -> None:
    """Restrict ``repo``'s work tree to ``paths`` (non-cone patterns, one per file); the next
    checkout writes only those files (a scratch repository needs no more than the hooked files)."""
    info = Path(repo.git_dir) / "info"
    info.mkdir(parents=True, exist_ok=True)
    patterns = sorted({f"/{p.lstrip('/')}" for p in paths})
    (info / "sparse-checkout").write_text("\n".join(patterns) + "\n", encoding="utf-8")
    repo.git.execute(argv("config", "core.sparseCheckout", "true"))
    repo.git.execute(argv("config", "core.sparseCheckoutCone", "false"))


def sparse_paths(repo: git.Repo) -> Set[str]:
    """The paths :func:`sparse_checkout` recorded (empty: no sparse checkout)."""
    path = Path(repo.git_dir) / "info" / "sparse-checkout"
    if not path.is_file():
        return set()
    return {p.lstrip("/") for p in path.read_text(encoding="utf-8").split() if p}


def clone_ref(url: str, ref: str, dest: os.PathLike, timeout: int = 900) -> str:
    """A one-commit checkout of ``ref`` (a branch, tag or commit id) of ``url`` in the new folder
    ``dest``, on branch ``main``; returns the commit.

    Raises:
        git.GitCommandError: unreachable URL or no such ref.
    """
    repo = git.Repo.init(str(dest), initial_branch="main", expand_vars=False)
    repo.git.execute(
        argv("fetch", "--quiet", "--depth=1", "--no-tags", url, ref), kill_after_timeout=timeout
    )
    commit = repo.git.execute(argv("rev-parse", "FETCH_HEAD^{commit}")).strip()
    repo.git.execute(argv("checkout", "--quiet", "--force", "-B", "main", commit))
    return commit


def init_bare(path: os.PathLike) -> git.Repo:
    """A new bare repository at ``path`` that serves partial and by-id fetches as GitHub does
    (tests and local runs stand one in for a remote)."""
    command().execute(argv("init", "--quiet", "--bare", "--initial-branch=main", str(path)))
    repo = git.Repo(str(path), expand_vars=False)
    for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
        repo.git.execute(argv("config", key, "true"))
    return repo


def clone(
    url: str,
    dest: os.PathLike,
    *,
    filter_spec: Optional[str] = None,
    depth: Optional[int] = None,
    sparse: Sequence[str] = (),
    upload_pack: Optional[str] = None,
) -> git.Repo:
    """``git clone`` as CI makes them: ``filter_spec`` (``blob:none``: blobless,
    ``tree:0``: treeless), ``depth`` (shallow), and with ``sparse`` a checkout of only those
    files (``()``: the whole tree). ``upload_pack``: the server command of a local URL (for a
    mirror that does not serve filters itself, ``git -c uploadpack.allowFilter=true
    upload-pack``)."""
    args = ["clone", "--quiet"]
    args += [f"--upload-pack={upload_pack}"] if upload_pack else []
    args += [f"--filter={filter_spec}"] if filter_spec else []
    args += [f"--depth={depth}"] if depth else []
    args += ["--no-checkout"] if sparse else []
    command().execute(argv(*args, "--", url, str(dest)))
    repo = git.Repo(str(dest), expand_vars=False)
    if sparse:
        sparse_checkout(repo, sparse)
        repo.git.execute(argv("read-tree", "-mu", "HEAD"))
    return repo
