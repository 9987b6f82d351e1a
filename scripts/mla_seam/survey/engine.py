"""The survey engine: the scratch :class:`Workspace` and :func:`survey` (see the package doc)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import git
from mla_seam import contracts, gitlayer, releases, upstream
from mla_seam.errors import RebaseError, SeamError, SeriesCorruptError, UpstreamError, UsageError
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


class Workspace:
    """A scratch repository for surveys: a shared clone of the user's checkout, or empty.

    Refs the user's checkout lacks are fetched from the mla-seam cache (releases materialized
    from PyPI sdists). Removed by :meth:`close` unless created with ``keep``.
    """

    def __init__(
        self, root: Path, repo: git.Repo, user: Optional[git.Repo], scratch: Optional[Path]
    ) -> None:
        self.root = root
        self.repo = repo
        self.user = user
        self.scratch = scratch  # removed on close; None for a kept workspace
        self.sources: Dict[str, str] = {}
        self._old_heads: Dict[str, Tuple[str, str, List[str]]] = {}
        self._probes: Dict[str, Dict[str, object]] = {}

    @classmethod
    def create(cls, user_root: Optional[Path], keep: Optional[Path] = None) -> "Workspace":
        """A new workspace cloned from ``user_root`` (a git work tree) or empty.

        With ``keep`` the repository is made at that (new or empty) folder and left there.
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
            else:
                repo = gitlayer.init_repo(root)
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

    def probes(self, commit: str) -> Dict[str, object]:
        """Contract probes of ``commit`` (cached)."""
        if commit not in self._probes:
            self._probes[commit] = contracts.probe_rev(self.repo, commit)
        return self._probes[commit]

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
        self.base, self.old_tag, self.old_commits = ws.old_series(series)
        self.history = gitlayer.is_ancestor(ws.repo, self.base, self.onto_commit)
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
            onto_version=version_at(self.ws.repo, self.onto_commit),
            onto_source=self.onto_source,
            history=self.history,
            patches=reports,
            old_contracts=self.ws.probes(self.base),
            new_contracts=self.values,
            new_head=head,
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
            report.commit = _commit(self.ws.repo, info)
            return report
        found = self._already_upstream(patch, info)
        if found is not None:
            report.cls, report.upstream_commit = PatchClass.UPSTREAM, found[1]
            report.detail = found[0]
            return report
        report.hunks = tuple(self._failed_hunks(info["diff"]))
        ok, text = gitlayer.apply_index(self.ws.root, patch.path, three_way=True)
        if ok:
            report.cls, report.commit = PatchClass.THREE_WAY, _commit(self.ws.repo, info)
            report.detail = "3-way merge needed, review: " + "; ".join(
                h.describe(self.old_tag) for h in report.hunks
            )
            return report
        gitlayer.reset_hard(self.ws.repo)
        report.cls = PatchClass.CONFLICT
        report.detail = "; ".join(h.describe(self.old_tag) for h in report.hunks) or (
            "every hunk applies alone but not together: "
            + (text.strip().splitlines() or ["git apply failed"])[-1]
        )
        return report

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

    def _patch_id_match(self, diff: str, files: Sequence[str]) -> Optional[Commit]:
        pid = gitlayer.patch_id(diff.encode("utf-8"), self.ws.root)
        if pid is None:
            return None
        if self._patch_ids is None:
            rev_range = f"{self.base}..{self.onto_commit}"
            touched = sorted({f for p in self.series.patches for f in p.files})
            self._patch_ids = gitlayer.commit_patch_ids(self.ws.repo, rev_range, touched)
        sha = self._patch_ids.get(pid)
        return Commit(sha, gitlayer.commit_subject(self.ws.repo, sha)) if sha else None

    def _introducing_commit(self, diff: str, files: Sequence[str]) -> Optional[Commit]:
        added = [
            ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+"
        ]
        added = [ln for ln in added if len(ln) > 8]
        if not added:
            return None
        needle = max(added, key=len)
        rows = gitlayer.log_touching(
            self.ws.repo, f"{self.base}..{self.onto_commit}", list(files), 1, needle
        )
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
        lines = self._base_lines(hunk)
        return HunkReport(hunk.file, hunk.header, lines, tuple(self._culprits(hunk.file, lines)))

    def _base_lines(self, hunk: Hunk) -> Tuple[int, int]:
        """Where the hunk's pre-image sits in the old base file (its header's lines if unsure)."""
        pre = hunk.preimage
        try:
            text = gitlayer.read_blob(self.ws.repo, self.base, hunk.file).decode("utf-8")
        except KeyError:
            text = ""
        lines = text.splitlines()
        for start in range(len(lines) - len(pre) + 1) if pre else ():
            if lines[start : start + len(pre)] == pre:
                return start + 1, start + len(pre)
        return hunk.old_start, hunk.old_start + max(len(pre), 1) - 1

    def _culprits(self, path: str, lines: Tuple[int, int]) -> List[Commit]:
        repo, end = self.ws.repo, self.onto_commit
        if self.history:
            try:
                last_seen = gitlayer.blame_reverse(repo, self.base, end, path, *lines)
            except git.GitCommandError:
                last_seen = []
            culprits: Dict[str, Commit] = {}
            for commit in dict.fromkeys(c for c in last_seen if c != end):
                found = gitlayer.first_descendant_touching(repo, commit, end, path)
                if found:
                    culprits.setdefault(found[0], Commit(*found))
            if culprits:
                return list(culprits.values())
        rows = gitlayer.log_touching(repo, f"{self.base}..{end}", [path], 5)
        return [Commit(*row) for row in rows]


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


def series_for_ref(
    lines: Sequence[Series], ref: str, version: str, repo: Optional[git.Repo] = None
) -> Tuple[Series, bool]:
    """:func:`series_for`, except that a ref naming a moving target (``main``, ``origin/dev``)
    that has a series gets that series and ``True`` (its version string is no guide), where
    ``repo`` (when given) holds the commit the series was made from; else the release lines'
    answer, with a warning."""
    target = releases.moving_target(ref)
    for s in lines:
        if target is None or s.name != target:
            continue
        commit = str(s.upstream.get("commit") or "")
        if repo is None or gitlayer.resolve_commit(repo, commit):
            return s, True
        log.warning(
            "mla-seam: %s: the %s series was made from %s, which this checkout lacks; "
            "surveying a release line instead (fetch that commit to survey the %s series)",
            ref,
            target,
            commit[:12],
            target,
        )
    return series_for([s for s in lines if s.name not in releases.MOVING_TARGETS], version)
