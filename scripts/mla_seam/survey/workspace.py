"""The survey's scratch repository (:class:`Workspace`) and what it reads of upstream trees.

A ``git clone --shared`` of the user's checkout (it borrows its objects and never writes to it)
plus any release it lacks, fetched from the mla-seam cache; its work tree is sparse (the files a
survey reads, :func:`survey_paths`). On a partial clone it fetches what a survey reads in one
batch (:meth:`Workspace.ensure`); :meth:`Workspace.history_base` names the checkout's own tag of
a line, where culprits are read from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import git
from mla_seam import contracts, gitlayer, paths, releases, upstream
from mla_seam.errors import (
    GitError,
    RebaseError,
    SeamError,
    SeriesCorruptError,
    UpstreamError,
    UsageError,
)
from mla_seam.gitlayer import partial
from mla_seam.releases import PACKAGE_INFO
from mla_seam.series import Series

log = logging.getLogger(__name__)


def version_at(repo: git.Repo, rev: str) -> str:
    """``MAJOR.MINOR.PATCH[PRE_RELEASE]`` from ``package_info.py`` at ``rev`` (parsed, not run)."""
    try:
        text = gitlayer.read_blob(repo, rev, PACKAGE_INFO).decode("utf-8")
    except KeyError:
        raise RebaseError(
            f"{rev} has no {PACKAGE_INFO}: not a megatron-core tree",
            "name a Megatron-LM tag or commit",
        ) from None
    try:
        return releases.parse_package_info(text)
    except (SyntaxError, ValueError) as exc:
        raise RebaseError(
            f"{PACKAGE_INFO} at {rev} names no version ({exc})", "name a Megatron-LM tag or commit"
        ) from None


# --- the scratch repository --------------------------------------------------------------------


def survey_paths(root: Optional[Path] = None) -> List[str]:
    """The files a survey reads: ``package_info.py``, the probed files and every file a line
    under ``root`` (default: the bundle's ``patches/``) hooks; a scratch work tree needs no more."""
    wanted = {PACKAGE_INFO, *contracts.PROBE_FILES}
    folder = Path(root) if root is not None else paths.patches_dir()
    for manifest in sorted(folder.glob("*/manifest.json")):
        try:
            files = json.loads(manifest.read_bytes()).get("files") or {}
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable manifest is the series loader's to report
        wanted.update(str(f) for f in files if isinstance(f, str))
    return sorted(wanted)


class Workspace:
    """A scratch repository for surveys: a shared clone of the user's checkout, or empty.

    Refs the user's checkout lacks are fetched from the mla-seam cache (releases materialized
    from PyPI sdists). Removed by :meth:`close` unless created with ``keep``.

    The work tree is sparse (:func:`survey_paths`: the hooked files, the probed files and
    ``package_info.py``) unless kept for a human. On a partial clone (blobless, treeless) the
    objects a survey reads are fetched in one batch into the clone's object store
    (:meth:`ensure`, :meth:`ensure_range`; refs, index and work tree of the clone are never
    touched), and the scratch copy may fetch anything missed from the clone's promisor remote.
    """

    def __init__(
        self, root: Path, repo: git.Repo, user: Optional[git.Repo], scratch: Optional[Path]
    ) -> None:
        self.root = root
        self.repo = repo
        self.user = user
        self.scratch = scratch  # removed on close; None for a kept workspace
        self.shape = gitlayer.clone_shape(user) if user is not None else None
        self.sources: Dict[str, str] = {}
        self._old_heads: Dict[str, Tuple[str, str, List[str]]] = {}
        self._probes: Dict[str, Dict[str, object]] = {}
        self._ensured: Set[Tuple[str, str]] = set()
        self._present: Optional[Set[str]] = None  # object ids the stores hold (partial clones)
        self._read_paths: Optional[List[str]] = None
        self._trees_fetched = False

    @classmethod
    def create(cls, user_root: Optional[Path], keep: Optional[Path] = None) -> "Workspace":
        """A new workspace cloned from ``user_root`` (a git work tree) or empty.

        With ``keep`` the repository is made at that (new or empty) folder and left there, with
        a whole work tree; otherwise the work tree is sparse.
        """
        if keep is not None:
            keep = Path(keep).resolve()
            if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
                raise UsageError(f"--keep {keep} exists and is not empty", "give a new folder")
            scratch, root = None, keep
        else:
            scratch = Path(tempfile.mkdtemp(prefix="mla-seam-rebase-"))
            root = scratch / "tree"
        try:
            user = gitlayer.open_repo(user_root) if user_root is not None else None
            if user is not None:
                repo = gitlayer.clone_shared(user_root, root)
                gitlayer.borrow_promisor(repo, gitlayer.clone_shape(user))
            else:
                repo = gitlayer.init_repo(root)
            if keep is None:
                gitlayer.sparse_checkout(repo, survey_paths())
        except BaseException:
            shutil.rmtree(scratch or root, ignore_errors=True)
            raise
        return cls(root, repo, user, scratch)

    def close(self) -> None:
        """Delete the scratch repository (a kept one stays)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a partial clone lacks --

    def need(self, relpaths: Iterable[str]) -> None:
        """Make sure a sparse work tree gets ``relpaths`` (a series of another bundle) from the
        next checkout on (every survey step checks its base out after calling this)."""
        have = gitlayer.sparse_paths(self.repo)
        if not have or set(relpaths) <= have:
            return
        gitlayer.sparse_checkout(self.repo, have | set(relpaths))

    def ensure(self, commits: Sequence[str], relpaths: Sequence[str]) -> None:
        """Fetch, in one batch, the blobs of ``relpaths`` at ``commits`` a partial clone lacks.

        Raises:
            GitError: the promisor remote is unreachable (exit 23; the message says what to
                fetch by hand).
        """
        todo = [c for c in commits if (c, ",".join(relpaths)) not in self._ensured]
        if not todo or self.shape is None or not self.shape.partial:
            return
        self._trees(todo)
        wanted: Set[str] = set()
        for commit in todo:
            wanted.update(gitlayer.blobs_at(self.repo, commit, list(relpaths)).values())
        self._fetch(wanted)
        self._ensured.update((c, ",".join(relpaths)) for c in todo)

    def ensure_range(self, start: str, end: str, relpaths: Sequence[str]) -> None:
        """Fetch, in one batch, every blob ``relpaths`` had in ``start..end`` (history queries:
        ``log -p``, ``log -S``, ``blame``) that a partial clone lacks."""
        key = (f"{start}..{end}", ",".join(relpaths))
        if key in self._ensured or self.shape is None or not self.shape.partial:
            return
        self._trees([end, start])
        self._fetch(gitlayer.blobs_in_range(self.repo, f"{start}..{end}", list(relpaths)))
        self._ensured.add(key)

    @property
    def read_paths(self) -> List[str]:
        """:func:`survey_paths` of the bundle, read once."""
        if self._read_paths is None:
            self._read_paths = survey_paths()
        return self._read_paths

    def _trees(self, commits: Sequence[str]) -> None:
        """A treeless clone gets the trees of ``commits``' history once (it becomes blobless)."""
        assert self.shape is not None and self.user is not None
        if not self.shape.treeless or self._trees_fetched:
            return
        # Only the clone's own commits: a release fetched from the mla-seam cache (an sdist's
        # root commit) is whole, and its remote has never heard of it.
        ours = [c for c in dict.fromkeys(commits) if gitlayer.resolve_commit(self.user, c)]
        if not ours:
            return
        log.info("mla-seam: %s is a treeless clone: fetching its trees", self.user.working_dir)
        gitlayer.fetch_trees(self.user, self.shape, ours)
        self._trees_fetched = True

    def _fetch(self, oids: Iterable[str]) -> None:
        assert self.shape is not None and self.user is not None
        if self._present is None:  # listed once: only our own fetches add upstream objects
            self._present = partial.present_objects(self.repo)
        lacking = sorted(set(oids) - self._present)
        if not lacking:
            return
        log.info(
            "mla-seam: fetching %d object(s) the %s clone lacks from %s",
            len(lacking),
            self.shape.kind,
            self.shape.promisor,
        )
        try:
            gitlayer.fetch_objects(self.user, self.shape, lacking)
        except SeamError as first:
            # The clone may be read-only (a shared cache): fetch into the scratch copy instead.
            scratch_shape = dataclasses.replace(self.shape, promisor=partial.SCRATCH_PROMISOR)
            try:
                gitlayer.fetch_objects(self.repo, scratch_shape, lacking)
            except SeamError:
                raise first from None
        self._present.update(lacking)

    # -- refs --

    def resolve(self, ref: str) -> Tuple[str, str]:
        """``(commit, source)`` of ``ref``: the user's checkout first, then the cache.

        Raises:
            UpstreamError: neither the checkout nor the known releases have ``ref``.
        """
        for candidate in (f"refs/tags/{ref}", ref, f"origin/{ref}"):
            commit = gitlayer.resolve_commit(self.repo, candidate)
            if commit:
                self.sources.setdefault(commit, "checkout")
                return commit, self.sources[commit]
        try:
            version = upstream.version_for(ref)
        except UpstreamError as err:
            if self.user is not None and self.shape is not None and self.shape.shallow:
                root = self.user.working_dir
                what = f"tag {ref}" if ref.startswith(upstream.TAG_PREFIX) else f"{ref}:{ref}"
                raise GitError(
                    f"{root} is a shallow clone without {ref!r}, and it is no known "
                    "megatron-core release to build from an sdist",
                    f"fetch it into the clone first: git -C {root} fetch --depth=1 origin {what}",
                ) from None
            where = "the checkout" if self.user is not None else "the cache"
            raise UpstreamError(
                f"unknown tag {ref!r}: not a ref of {where} and not a known megatron-core "
                f"release ({err.message.split('; ', 1)[-1]})",
                "name a tag of the checkout (git tag -l 'core_v*') or a known release",
            ) from None
        tag = upstream.tag_for(version)
        commit = gitlayer.resolve_commit(self.repo, f"refs/tags/{tag}")
        if commit is None:
            cached = upstream.get(version)
            gitlayer.fetch_tags(self.repo, cached, [tag])
            commit = gitlayer.tag_commit(self.repo, tag)
            if commit is None:
                raise UpstreamError(f"could not fetch {tag} from {cached}", "see the log above")
            origin = (upstream.cached_source(version) or {}).get("source", "sdist")
            self.sources[commit] = f"mla-seam cache ({origin})"
        self.sources.setdefault(commit, "checkout")
        return commit, self.sources[commit]

    def from_checkout(self, commit: str) -> bool:
        """Whether ``commit`` came from the user's checkout (not from the mla-seam cache)."""
        return self.user is not None and self.sources.get(commit, "checkout") == "checkout"

    def probes(self, commit: str) -> Dict[str, object]:
        """Contract probes of ``commit`` (cached)."""
        if commit not in self._probes:
            self.ensure([commit], contracts.PROBE_FILES)
            self._probes[commit] = contracts.probe_rev(self.repo, commit)
        return self._probes[commit]

    def version_at(self, commit: str) -> str:
        """:func:`version_at` of ``commit``, its ``package_info.py`` fetched first if missing."""
        self.ensure([commit], [PACKAGE_INFO])
        return version_at(self.repo, commit)

    # -- the old series replayed --

    def old_series(self, series: Series) -> Tuple[str, str, List[str]]:
        """``(base commit, base tag, [commit per patch])`` of ``series`` replayed on its base.

        Raises:
            SeriesCorruptError: the series does not apply to its own base.
        """
        if series.name in self._old_heads:
            return self._old_heads[series.name]
        tag = str(series.upstream.get("tag") or "")
        base = gitlayer.resolve_commit(self.repo, f"refs/tags/{tag}") if tag else None
        if base is None:
            base = gitlayer.resolve_commit(self.repo, str(series.upstream.get("commit") or ""))
        if base is None and releases.moving_target(tag):
            # A branch moves on: its name is no longer the commit the series was made from.
            commit = str(series.upstream.get("commit") or "")
            raise RebaseError(
                f"the {series.name} series was made from {tag} at {commit[:12]}, which this "
                "checkout lacks",
                f"fetch that commit into the checkout (git fetch origin {commit}), or pass "
                "--from with a release line",
            )
        if base is None:
            base, _ = self.resolve(tag or series.line)
        self.need(series.touched)
        self.ensure([base], series.touched)
        gitlayer.checkout_detached(self.repo, base)
        commits = []
        for patch in series.patches:
            info = gitlayer.mailinfo(patch.path.read_bytes(), self.root)
            ok, report = gitlayer.apply_index(self.root, patch.path)
            if not ok:
                raise SeriesCorruptError(
                    f"{series.name}/{patch.name} does not apply to its own base {tag}: "
                    f"{report.strip().splitlines()[-1] if report.strip() else 'git apply failed'}",
                    "the series folder and its manifest disagree with upstream; restore patches/ "
                    "from the mla-seam repository",
                )
            commits.append(commit_mail(self.repo, info))
        self._old_heads[series.name] = (base, tag, commits)
        return self._old_heads[series.name]

    def history_base(self, series: Series, onto_commit: str) -> Tuple[Optional[str], str]:
        """The tag of ``series``' line this checkout has, to read upstream history from.

        The series' own base tag when the checkout has it, else the newest tag of a release the
        line serves (``core_v0.19.0`` for a line exported from the 0.19.2 sdist): the commits
        between it and ``onto_commit`` are the ones that can have moved a hook.

        Returns:
            ``(tag or None, why)``.
        """
        if self.user is None:
            return None, "no checkout: releases come from the mla-seam cache (PyPI sdists)"
        if not self.from_checkout(onto_commit):
            return None, "the target comes from the mla-seam cache (a PyPI sdist)"
        own = str(series.upstream.get("tag") or "")
        tags = gitlayer.tags_at(self.user)
        candidates = [own] + [
            releases.tag_of(v)
            for v in sorted(series.releases, key=releases.version_key, reverse=True)
        ]
        for tag in dict.fromkeys(candidates):
            if tag in tags and gitlayer.merge_base(self.repo, tags[tag], onto_commit):
                return tag, f"{tag} of the checkout"
        if self.shape is not None and self.shape.shallow:
            root = self.user.working_dir
            return None, (
                f"{root} is a shallow clone: the history between {own or series.name} and the "
                f"target is not there (git -C {root} fetch --unshallow gives it)"
            )
        have = [t for t in candidates if t in tags]
        if have:
            return None, f"{have[0]} of the checkout shares no history with the target"
        return None, (
            f"the checkout has no tag of {series.name}'s releases "
            f"({', '.join(series.releases)}; releases from PyPI sdists share no history)"
        )


def commit_mail(repo: git.Repo, info: Mapping[str, str]) -> str:
    """Commit the index with the message, author and date of a patch mail (``mailinfo``)."""
    message = info.get("subject", "") + "\n" + ("\n" + info["body"] if info.get("body") else "")
    return gitlayer.commit_replayed(
        repo,
        message,
        info.get("author") or gitlayer.SEAM_IDENT["name"],
        info.get("email") or gitlayer.SEAM_IDENT["email"],
        info.get("date") or "2000-01-01T00:00:00+00:00",
    )
