"""The survey engine: the scratch :class:`Workspace` and :func:`survey` (see the package doc)."""

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
from mla_seam.errors import RebaseError, SeamError, SeriesCorruptError, UpstreamError, UsageError
from mla_seam.gitlayer import partial
from mla_seam.releases import PACKAGE_INFO
from mla_seam.series import PatchEntry, Series, load_series
from mla_seam.survey.model import (
    Commit,
    Hunk,
    HunkReport,
    PatchClass,
    PatchReport,
    Survey,
    hook_of,
    offsets_of,
    split_hunks,
)

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
        """Make sure a sparse work tree has ``relpaths`` (a series of another bundle)."""
        have = gitlayer.sparse_paths(self.repo)
        if not have or set(relpaths) <= have:
            return
        gitlayer.sparse_checkout(self.repo, have | set(relpaths))
        if gitlayer.head_commit(self.repo):
            gitlayer.checkout_detached(self.repo, gitlayer.head_commit(self.repo) or "HEAD")

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

    def _trees(self, commits: Sequence[str]) -> None:
        """A treeless clone gets the trees of ``commits``' history once (it becomes blobless)."""
        assert self.shape is not None and self.user is not None
        if not self.shape.treeless or self._trees_fetched:
            return
        log.info("mla-seam: %s is a treeless clone: fetching its trees", self.user.working_dir)
        gitlayer.fetch_trees(self.user, self.shape, list(dict.fromkeys(commits)))
        self._trees_fetched = True

    def _fetch(self, oids: Iterable[str]) -> None:
        assert self.shape is not None and self.user is not None
        lacking = gitlayer.missing(self.repo, oids)
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
            where = "the checkout" if self.user is not None else "the cache"
            hint = "name a tag of the checkout (git tag -l 'core_v*') or a known release"
            if self.shape is not None and self.shape.shallow:
                hint = (
                    f"{self.user.working_dir if self.user else 'the checkout'} is a shallow clone "
                    f"without {ref}: fetch it first (git fetch --depth=1 origin tag {ref}, or "
                    f"git fetch origin {ref})"
                )
            raise UpstreamError(
                f"unknown tag {ref!r}: not a ref of {where} and not a known megatron-core "
                f"release ({err.message.split('; ', 1)[-1]})",
                hint,
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
            commits.append(_commit(self.repo, info))
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


def _commit(repo: git.Repo, info: Mapping[str, str]) -> str:
    message = info.get("subject", "") + "\n" + ("\n" + info["body"] if info.get("body") else "")
    return gitlayer.commit_replayed(
        repo,
        message,
        info.get("author") or gitlayer.SEAM_IDENT["name"],
        info.get("email") or gitlayer.SEAM_IDENT["email"],
        info.get("date") or "2000-01-01T00:00:00+00:00",
    )


# --- the survey --------------------------------------------------------------------------------


class _Surveyor:
    """Tries every patch of one series on one new base, in the workspace."""

    def __init__(self, ws: Workspace, series: Series, onto: str) -> None:
        self.ws = ws
        self.series = series
        self.onto = onto
        self.onto_commit, self.onto_source = ws.resolve(onto)
        ws.need(series.touched)
        ws.ensure([self.onto_commit], list(series.touched) + [PACKAGE_INFO])
        self.base, self.old_tag, self.old_commits = ws.old_series(series)
        # Upstream history (culprits, patch-ids) is read between the checkout's own tag of the
        # line and the target, never from a release root commit built from an sdist.
        self.history_tag, self.history_why = ws.history_base(series, self.onto_commit)
        self.history_start: Optional[str] = None
        if self.history_tag:
            tag_commit = gitlayer.resolve_commit(ws.repo, f"refs/tags/{self.history_tag}")
            self.history_start = tag_commit
        elif gitlayer.is_ancestor(ws.repo, self.base, self.onto_commit):
            self.history_start = self.base  # synthetic history on top of a materialized release
            self.history_tag = self.old_tag
            self.history_why = f"{self.old_tag} is an ancestor of {onto}"
        self.history = self.history_start is not None
        if not self.history:
            self.history_why += (
                "; culprits: the release commit (a release built from a PyPI sdist is one root "
                "commit: the whole upstream change between two releases)"
                if gitlayer.is_root(ws.repo, self.onto_commit)
                else "; no culprits can be named"
            )
        self.values = ws.probes(self.onto_commit)
        self._patch_ids: Optional[Dict[str, str]] = None

    def run(self) -> Survey:
        gitlayer.checkout_detached(self.ws.repo, self.onto_commit)
        reports = [self._one(patch) for patch in self.series.patches]
        head = gitlayer.head_commit(self.ws.repo) or self.onto_commit
        return Survey(
            series=self.series,
            old_tag=self.old_tag,
            old_commit=self.base,
            old_head=self.old_commits[-1] if self.old_commits else self.base,
            onto=self.onto,
            onto_commit=self.onto_commit,
            onto_version=self.ws.version_at(self.onto_commit),
            onto_source=self.onto_source,
            history=self.history,
            patches=reports,
            old_contracts=self.ws.probes(self.base),
            new_contracts=self.values,
            new_head=head,
            history_base=self.history_tag if self.history else None,
            history_detail=self.history_why,
        )

    def _one(self, patch: PatchEntry) -> PatchReport:
        info = gitlayer.mailinfo(patch.path.read_bytes(), self.ws.root)
        subject = info.get("subject", "")
        report = PatchReport(patch.name, hook_of(subject), subject, PatchClass.EXACT, patch.files)
        held = contracts.obsolete_if(info.get("body", ""), self.values)
        if held:
            report.cls, report.detail = PatchClass.OBSOLETE, f"Obsolete-If: {held} holds"
            return report
        ok, text = gitlayer.apply_index(self.ws.root, patch.path)
        if ok:
            report.offsets = offsets_of(text)
            report.cls = PatchClass.OFFSET if report.offsets else PatchClass.EXACT
            report.detail = _offset_detail(report.offsets)
            report.commit = _commit(self.ws.repo, self._ported(info, report))
            return report
        found = self._already_upstream(patch, info)
        if found is not None:
            report.cls, report.upstream_commit = PatchClass.UPSTREAM, found[1]
            report.detail = found[0]
            return report
        report.hunks = tuple(self._failed_hunks(info["diff"]))
        ok, text = gitlayer.apply_index(self.ws.root, patch.path, three_way=True)
        if ok:
            report.cls = PatchClass.THREE_WAY
            report.detail = "3-way merge needed, review: " + "; ".join(
                h.describe(self.old_tag) for h in report.hunks
            )
            report.commit = _commit(self.ws.repo, self._ported(info, report))
            return report
        gitlayer.reset_hard(self.ws.repo)
        report.cls = PatchClass.CONFLICT
        report.detail = "; ".join(h.describe(self.old_tag) for h in report.hunks) or (
            "every hunk applies alone but not together: "
            + (text.strip().splitlines() or ["git apply failed"])[-1]
        )
        return report

    def _ported(self, info: Mapping[str, str], report: PatchReport) -> Dict[str, str]:
        """The patch's mail with its header brought up to date for the new base.

        A patch whose hunks moved (offset) or were merged 3-way gets ``Last-Update:`` set to the
        date of the newest upstream commit that changed its files as of the new base
        (deterministic: the same target gives the same bytes), and a 3-way merge is recorded in
        a ``Merged-3way:`` line naming the target and the hunks to review. An exact patch is
        carried verbatim.
        """
        if report.cls is PatchClass.EXACT:
            return dict(info)
        date = gitlayer.last_change_date(self.ws.repo, self.onto_commit, list(report.files))
        merged = None
        if report.cls is PatchClass.THREE_WAY:
            hunks = ", ".join(f"{h.file.rsplit('/', 1)[-1]} {h.header}" for h in report.hunks)
            merged = f"3-way onto {self.onto} ({self.onto_commit[:12]}) from {self.old_tag}" + (
                f"; review {hunks}" if hunks else ""
            )
        return dict(info, body=port_header(info.get("body", ""), date, merged))

    # -- already upstream --

    def _already_upstream(
        self, patch: PatchEntry, info: Mapping[str, str]
    ) -> Optional[Tuple[str, Optional[Commit]]]:
        reversed_ok = self._reverses(patch)
        by_id = self._patch_id_match(info["diff"], patch.files)
        if not reversed_ok and by_id is None:
            return None
        commit = by_id or self._introducing_commit(info["diff"], patch.files)
        how = "reverse-applies" if reversed_ok else "an upstream commit has its patch-id"
        where = f"; introduced by {commit}" if commit else ""
        return f"already in {self.onto} ({how}{where})", commit

    def _reverses(self, patch: PatchEntry) -> bool:
        """Whether ``patch`` reverse-applies on the new base, alone or under the later patches.

        A hook whose context holds the line a later hook adds (H8 right below H2) reverses only
        once the later ones are taken out: a base that carries the whole series is tried with
        the series from its last patch down to this one.
        """
        try:
            gitlayer.apply_patch(self.ws.root, patch.path, check=True, reverse=True)
            return True
        except git.GitCommandError:
            pass
        later = self.series.patches[self.series.patches.index(patch) :]
        if len(later) == 1:
            return False
        # git apply --check does not chain patches that touch one file; apply for real (all or
        # nothing) and put the work tree back.
        try:
            gitlayer.apply_patch(self.ws.root, [p.path for p in reversed(later)], reverse=True)
        except git.GitCommandError:
            return False
        gitlayer.reset_hard(self.ws.repo)
        return True

    def _history_range(self, paths: Sequence[str]) -> Optional[str]:
        """``start..target`` for history queries over ``paths`` (their blobs fetched), or
        ``None`` when the checkout holds no history between the line and the target."""
        if self.history_start is None:
            return None
        self.ws.ensure_range(self.history_start, self.onto_commit, list(paths))
        return f"{self.history_start}..{self.onto_commit}"

    def _patch_id_match(self, diff: str, files: Sequence[str]) -> Optional[Commit]:
        pid = gitlayer.patch_id(diff.encode("utf-8"), self.ws.root)
        if pid is None:
            return None
        if self._patch_ids is None:
            touched = sorted({f for p in self.series.patches for f in p.files})
            rev_range = self._history_range(touched)
            self._patch_ids = (
                gitlayer.commit_patch_ids(self.ws.repo, rev_range, touched) if rev_range else {}
            )
        sha = self._patch_ids.get(pid)
        return Commit(sha, gitlayer.commit_subject(self.ws.repo, sha)) if sha else None

    def _introducing_commit(self, diff: str, files: Sequence[str]) -> Optional[Commit]:
        added = [
            ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+"
        ]
        added = [ln for ln in added if len(ln) > 8]
        rev_range = self._history_range(list(files)) if added else None
        if not added or rev_range is None:
            return None
        needle = max(added, key=len)
        rows = gitlayer.log_touching(self.ws.repo, rev_range, list(files), 1, needle)
        return Commit(*rows[0]) if rows else None

    # -- conflicts --

    def _failed_hunks(self, diff: str) -> List[HunkReport]:
        failed = []
        with tempfile.TemporaryDirectory(prefix="mla-seam-hunk-") as tmp:
            for k, (header, hunk) in enumerate(split_hunks(diff)):
                single = Path(tmp) / f"{k}.patch"
                single.write_text(header + hunk.header + "\n" + "\n".join(hunk.lines) + "\n")
                try:
                    gitlayer.apply_patch(self.ws.root, single, check=True)
                except git.GitCommandError:
                    failed.append(self._hunk_report(hunk))
        return failed

    def _hunk_report(self, hunk: Hunk) -> HunkReport:
        lines = _find_lines(self._file_at(self.base, hunk.file), hunk)
        culprits = self._culprits(hunk)
        return HunkReport(hunk.file, hunk.header, lines, tuple(culprits))

    def _file_at(self, rev: str, path: str) -> str:
        self.ws.ensure([rev], [path])
        try:
            return gitlayer.read_blob(self.ws.repo, rev, path).decode("utf-8")
        except KeyError:
            return ""

    def _culprits(self, hunk: Hunk) -> List[Commit]:
        """The upstream commits between the line's tag and the target that changed the hunk's
        pre-image lines, each once, oldest first.

        ``git blame --reverse`` from the merge base of the checkout's tag and the target (release
        tags sit on release branches) finds, for each pre-image line, the last commit that still
        had it; the commit after it on the way to the target changed it. A commit also on the
        release branch (same patch-id as one between the merge base and the tag) was already in
        the old base and is left out. No shared history: the target itself when it is a release
        root commit (an sdist: the whole release), else none.
        """
        repo, end, path = self.ws.repo, self.onto_commit, hunk.file
        start = self.history_start
        if start is None:
            if gitlayer.is_root(repo, end) and self.base != end:
                return [Commit(end, gitlayer.commit_subject(repo, end))]  # a release root commit
            return []
        fork = gitlayer.merge_base(repo, start, end) or start
        rev_range = self._history_range([path])
        assert rev_range is not None
        self.ws.ensure_range(fork, end, [path])
        lines = _find_lines(self._file_at(fork, path), hunk, exact=True)
        culprits: Dict[str, Commit] = {}
        if lines is not None:
            try:
                last_seen = gitlayer.blame_reverse(repo, fork, end, path, *lines)
            except git.GitCommandError:
                last_seen = []
            for commit in dict.fromkeys(c for c in last_seen if c != end):
                found = gitlayer.first_descendant_touching(repo, commit, end, path)
                if found:
                    culprits.setdefault(found[0], Commit(*found))
        if not culprits:
            rows = gitlayer.log_touching(repo, rev_range, [path], 5)
            culprits = {sha: Commit(sha, subject) for sha, subject in reversed(rows)}
        if fork != start:
            self.ws.ensure_range(fork, start, [path])
            released = set(gitlayer.commit_patch_ids(repo, f"{fork}..{start}", [path]))
            mine = gitlayer.commit_patch_ids(repo, f"{fork}..{end}", [path])
            already = {sha for pid, sha in mine.items() if pid in released}
            culprits = {sha: c for sha, c in culprits.items() if sha not in already}
        return list(culprits.values())


def _find_lines(text: str, hunk: Hunk, exact: bool = False) -> Optional[Tuple[int, int]]:
    """Where the hunk's pre-image sits in ``text`` (1-based, inclusive); its header's lines when
    not found, or ``None`` with ``exact``."""
    pre = hunk.preimage
    lines = text.splitlines()
    for start in range(len(lines) - len(pre) + 1) if pre else ():
        if lines[start : start + len(pre)] == pre:
            return start + 1, start + len(pre)
    if exact:
        return None
    return hunk.old_start, hunk.old_start + max(len(pre), 1) - 1


def port_header(body: str, date: str, merged: Optional[str]) -> str:
    """A patch message body with ``Last-Update:`` set to ``date`` and, when given, a
    ``Merged-3way:`` line (replacing an older one) right after it."""
    out, seen = [], False
    skipping = False
    for line in body.splitlines(keepends=True):
        if skipping and line.startswith(" "):
            continue  # the continuation of a replaced Merged-3way line
        skipping = False
        if line.startswith("Merged-3way:"):
            skipping = True
            continue
        if line.startswith("Last-Update:"):
            seen = True
            out.append(f"Last-Update: {date}\n")
            if merged:
                out.append(f"Merged-3way: {merged}\n")
            continue
        out.append(line)
    if not seen:
        extra = f"Last-Update: {date}\n" + (f"Merged-3way: {merged}\n" if merged else "")
        out.append(extra)
    return "".join(out)


def _offset_detail(offsets: Sequence[int]) -> str:
    if not offsets:
        return "applies as recorded"
    return "moved: " + ", ".join(f"{o:+d} lines" for o in offsets)


def survey(ws: Workspace, series: Series, onto: str, *, range_diff: bool = True) -> Survey:
    """Try every patch of ``series`` on ``onto`` in ``ws``; HEAD ends on the new commits.

    Args:
        ws: The scratch workspace.
        series: The old line.
        onto: Tag (or any ref) of the new base.
        range_diff: Also compute the range-diff of the old against the new series.

    Returns:
        The :class:`Survey`.
    """
    result = _Surveyor(ws, series, onto).run()
    if range_diff:
        result.range_diff = series_range_diff(
            ws, result.old_commit, result.old_head, result.onto_commit, result.new_head
        )
    return result


def series_range_diff(
    ws: Workspace, old_base: str, old_head: str, new_base: str, new_head: str
) -> str:
    """``git range-diff`` of the old series against the new one, empty series included.

    git refuses an empty range (``fatal: need two commit ranges``), which is what a new base
    that already holds every hook gives: every patch upstream or obsolete, nothing carried.
    That case is a result, not an error: every old commit is listed as dropped.
    """
    if old_head != old_base and new_head != new_base:
        return gitlayer.range_diff(ws.repo, f"{old_base}..{old_head}", f"{new_base}..{new_head}")
    old = gitlayer.rev_list(ws.repo, f"{old_base}..{old_head}")
    new = gitlayer.rev_list(ws.repo, f"{new_base}..{new_head}")
    lines = [
        f"-:  ------- > {k}:  {sha[:7]} {gitlayer.commit_subject(ws.repo, sha)}"
        for k, sha in enumerate(new, 1)
    ]
    lines = [
        f"{k}:  {sha[:7]} < -:  ------- {gitlayer.commit_subject(ws.repo, sha)}"
        for k, sha in enumerate(old, 1)
    ] + lines
    if not lines:
        return ""
    empty = "new" if not new else "old"
    return (
        f"(the {empty} series is empty: range-diff lists every commit of the other)\n"
        + "\n".join(lines)
    )


# --- release lines ---------------------------------------------------------------------------


def load_lines(root: Path, strict: bool = True) -> List[Series]:
    """Every release line under ``root``, validated; ``strict=False`` skips broken ones (logged).

    Raises:
        SeriesCorruptError: a line does not validate (``strict``).
        UsageError: there is no line at all.
    """
    lines = []
    for line_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            lines.append(load_series(line_dir))
        except SeamError as err:
            if strict:
                raise
            log.warning("mla-seam: skipping %s: %s", line_dir.name, err.message)
    if not lines:
        raise UsageError(
            f"no release line under {root}", "pass --from LINE, or check MLA_SEAM_ROOT"
        )
    return lines


def series_for(lines: Sequence[Series], version: str) -> Tuple[Series, bool]:
    """The line that serves ``version`` and ``True``; else the line to start a rebase from.

    That is the line of the same ``MAJOR.MINOR`` (a patch release it does not list yet), else the
    newest line older than ``version``, else the oldest line.
    """
    for s in lines:
        if version in s.releases:
            return s, True
    same = [s for s in lines if s.line == releases.line_of(version)]
    if same:
        return same[0], False
    key = releases.version_key(version)
    older = [
        s for s in lines if releases.version_key(max(s.releases, key=releases.version_key)) <= key
    ]
    return (older[-1] if older else lines[0]), False
