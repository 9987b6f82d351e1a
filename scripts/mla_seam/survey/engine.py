"""The survey engine: :func:`survey` of one series on one new base (see the package doc)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import git
from mla_seam import contracts, gitlayer, releases
from mla_seam.errors import SeamError, UsageError
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
from mla_seam.survey.workspace import (  # noqa: F401 (re-exported)
    Workspace,
    commit_mail,
    survey_paths,
    version_at,
)

log = logging.getLogger(__name__)

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
            report.commit = commit_mail(self.ws.repo, self._ported(info, report))
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
            report.commit = commit_mail(self.ws.repo, self._ported(info, report))
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
