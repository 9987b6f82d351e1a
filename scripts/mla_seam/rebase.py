"""The ``rebase`` verb: move a release line's hook series onto another upstream tag.

::

    mla-seam rebase --megatron DIR --onto TAG [--from LINE] [--write] [--accept-three-way]
                    [--keep PATH] [--resolved REF] [--releases V,V] [--json FILE]
    mla-seam rebase --refresh-overlay [--check]

Everything happens in a scratch repository: a ``git clone --shared`` of DIR (it borrows DIR's
objects and never writes to DIR) plus any release DIR lacks, fetched from the mla-seam cache.
``patches/`` changes only with ``--write``, and then in one rename.

The survey replays the old series on its own base tag (so every pre-image blob its ``index``
lines name exists), then tries EVERY patch on TAG, in order, and classifies each
(:class:`PatchClass`):

* ``exact`` / ``offset``: applies strictly (no fuzz), at the recorded lines or moved;
* ``three_way``: only ``git apply --3way`` merges it; carried, but flagged for review (``--write``
  needs ``--accept-three-way``);
* ``conflict``: nothing applies; the report names the file, the hunk, where its pre-image sat
  and the upstream commits between the two tags that touched those lines;
* ``upstream``: the change is already in TAG (the patch reverse-applies, or an upstream commit
  has its patch-id); dropped from the new series and reported;
* ``obsolete``: an ``Obsolete-If: <probe>=<value>`` trailer of the patch header holds on TAG
  (:mod:`mla_seam.contracts`): the problem the hook works around is gone there; dropped and
  reported.

The report also holds the contract drift between the two tags (probes of the upstream API the
adapter relies on) and a range-diff of the old series against the new one. Conflicts are
resolved by a human: ``--keep PATH`` keeps the scratch repository with branch
``mla-seam/rebase`` (the carried patches) and the conflicting patches' messages; commit the hook
there, then ``--megatron PATH --resolved mla-seam/rebase --write`` exports it (see
``patches/README.md``). Exports are byte-stable: the same commits give the same bytes, so a
patch whose applied result did not change keeps its bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import git
from mla_seam import contracts, gitlayer, paths, releases, upstream
from mla_seam.errors import (
    DirtyTreeError,
    InterruptedRunError,
    PatchFailedError,
    RebaseError,
    SeamError,
    SeriesCorruptError,
    UpstreamError,
    UsageError,
)
from mla_seam.releases import PACKAGE_INFO
from mla_seam.series import (
    PatchEntry,
    Series,
    json_bytes,
    load_series,
    series_by_name,
    write_series,
)
from mla_seam.tree import MegatronTree, crash_point, replace_atomic

log = logging.getLogger(__name__)

REBASE_BRANCH = "mla-seam/rebase"
OLD_BRANCH = "mla-seam/old"
KEEP_NOTES = "mla-seam-rebase"  # folder inside the kept repository's .git
_HOOK_RE = re.compile(r"\bmla-seam (H\d+)\b")
_OFFSET_RE = re.compile(r"^Hunk #(\d+) succeeded at (\d+) \(offset (-?\d+) lines?\)\.$")
_FAILED_AT_RE = re.compile(r"^error: patch failed: (.+):(\d+)$")
_STAGING_PREFIX = ".rebase-"


def _emit(text: str) -> None:
    """The one place result lines are written to stdout."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


# --- the report model --------------------------------------------------------------------------


class PatchClass(str, enum.Enum):
    """What happened to one patch on the new base; the values are stable (drift schema)."""

    EXACT = "exact"
    OFFSET = "offset"
    THREE_WAY = "three_way"
    CONFLICT = "conflict"
    UPSTREAM = "upstream"
    OBSOLETE = "obsolete"

    @property
    def carried(self) -> bool:
        """Whether the patch goes into the new series."""
        return self in (PatchClass.EXACT, PatchClass.OFFSET, PatchClass.THREE_WAY)


@dataclasses.dataclass(frozen=True)
class Commit:
    """An upstream commit named in a report."""

    sha: str
    subject: str

    def __str__(self) -> str:
        return f"{self.sha[:12]} {self.subject!r}"

    def to_json(self) -> Dict[str, str]:
        """``{"commit": .., "subject": ..}``."""
        return {"commit": self.sha, "subject": self.subject}


@dataclasses.dataclass(frozen=True)
class Hunk:
    """One hunk of a patch, as text."""

    file: str
    header: str
    lines: Tuple[str, ...]  # body lines with their ' ', '-', '+' tag

    @property
    def preimage(self) -> List[str]:
        """The lines the hunk expects (context and removed lines)."""
        return [ln[1:] for ln in self.lines if ln[:1] in (" ", "-")]

    @property
    def old_start(self) -> int:
        """The pre-image start line the header records."""
        return int(self.header.split()[1].lstrip("-").split(",")[0])


@dataclasses.dataclass(frozen=True)
class HunkReport:
    """A hunk that did not apply strictly, with the upstream commits that moved its lines."""

    file: str
    header: str
    base_lines: Tuple[int, int]
    culprits: Tuple[Commit, ...]

    def describe(self, old_tag: str) -> str:
        """``file @@ .. @@ (lines a-b at TAG) changed by: c1, c2``."""
        first, last = self.base_lines
        who = ", ".join(str(c) for c in self.culprits) or "no commit found"
        return f"{self.file} {self.header} (pre-image lines {first}-{last} at {old_tag}); by: {who}"

    def to_json(self) -> Dict[str, object]:
        """JSON form for ``--json`` and the drift report's ``detail``."""
        return {
            "file": self.file,
            "hunk": self.header,
            "base_lines": list(self.base_lines),
            "culprits": [c.to_json() for c in self.culprits],
        }


@dataclasses.dataclass
class PatchReport:
    """The survey's verdict on one patch of the old series."""

    name: str
    hook: str
    subject: str
    cls: PatchClass
    files: Tuple[str, ...]
    offsets: Tuple[int, ...] = ()
    detail: str = ""
    hunks: Tuple[HunkReport, ...] = ()
    upstream_commit: Optional[Commit] = None
    commit: Optional[str] = None  # the replayed commit in the scratch repository

    def to_json(self) -> Dict[str, object]:
        """The drift schema's ``patches[]`` entry (plus ``hunks``/``upstream_commit``)."""
        return {
            "name": self.name,
            "hook": self.hook,
            "class": self.cls.value,
            "offsets": list(self.offsets),
            "detail": self.detail,
            "files": list(self.files),
            "hunks": [h.to_json() for h in self.hunks],
            "upstream_commit": self.upstream_commit.to_json() if self.upstream_commit else None,
        }


@dataclasses.dataclass
class Survey:
    """Everything ``rebase`` learned about one old series on one new base."""

    series: Series
    old_tag: str
    old_commit: str
    old_head: str
    onto: str
    onto_commit: str
    onto_version: str
    onto_source: str
    history: bool
    patches: List[PatchReport]
    old_contracts: Dict[str, object]
    new_contracts: Dict[str, object]
    new_head: str = ""
    range_diff: str = ""

    @property
    def changes(self) -> List[contracts.Change]:
        """Contract probes whose value differs between the old and the new base."""
        return contracts.diff(self.old_contracts, self.new_contracts)

    @property
    def conflicts(self) -> List[PatchReport]:
        """Patches that need a human."""
        return [p for p in self.patches if p.cls is PatchClass.CONFLICT]

    @property
    def three_way(self) -> List[PatchReport]:
        """Patches carried through a 3-way merge (to review)."""
        return [p for p in self.patches if p.cls is PatchClass.THREE_WAY]

    @property
    def history_note(self) -> str:
        """Whether culprits are commits or whole releases."""
        if self.history:
            return f"{self.old_tag} is an ancestor of {self.onto}: culprits are upstream commits"
        return (
            f"no shared history between {self.old_tag} and {self.onto} in this checkout (a "
            "checkout built from PyPI sdists has one root commit per release): a culprit is the "
            "release commit, i.e. the whole upstream change between the two releases"
        )

    def counts(self) -> Dict[str, int]:
        """Patches per class."""
        counts = {c.value: 0 for c in PatchClass}
        for p in self.patches:
            counts[p.cls.value] += 1
        return counts

    def to_json(self) -> Dict[str, object]:
        """The ``--json`` report (``schema_version`` 1)."""
        return {
            "schema_version": 1,
            "series": self.series.name,
            "from": {"tag": self.old_tag, "commit": self.old_commit},
            "onto": {
                "ref": self.onto,
                "commit": self.onto_commit,
                "version": self.onto_version,
                "source": self.onto_source,
            },
            "history": self.history,
            "history_note": self.history_note,
            "patches": [p.to_json() for p in self.patches],
            "counts": self.counts(),
            "contracts": self.new_contracts,
            "contract_changes": [c.to_json() for c in self.changes],
            "adapter_problems": contracts.adapter_problems(self.new_contracts),
            "range_diff": self.range_diff,
        }


# --- patches as text ---------------------------------------------------------------------------


def hook_of(subject: str) -> str:
    """``H1`` from ``mla-seam H1: ...`` (``?`` when the subject names no hook)."""
    match = _HOOK_RE.search(subject)
    return match.group(1) if match else "?"


def split_hunks(diff: str) -> List[Tuple[str, Hunk]]:
    """``(file header text, hunk)`` for every hunk of a git diff."""
    result: List[Tuple[str, Hunk]] = []
    header: List[str] = []
    current: Optional[List[str]] = None
    path = ""
    hunk_header = ""

    def flush() -> None:
        if current is not None:
            result.append(("".join(header), Hunk(path, hunk_header, tuple(current))))

    for line in diff.splitlines(keepends=True):
        if line.startswith("diff --git "):
            flush()
            current, header = None, [line]
            path = line.split(" b/", 1)[-1].strip()
        elif line.startswith("@@ "):
            flush()
            current, hunk_header = [], line.split(" @@")[0] + " @@"
        elif current is not None and line[:1] in (" ", "-", "+", "\\", "\n"):
            current.append(line.rstrip("\n"))
        elif current is None:
            header.append(line)
    flush()
    return result


def _offsets(report: str) -> Tuple[int, ...]:
    return tuple(
        int(m.group(3)) for m in (_OFFSET_RE.match(ln.strip()) for ln in report.splitlines()) if m
    )


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
            report.offsets = _offsets(text)
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
        try:
            gitlayer.apply_patch(self.ws.root, patch.path, check=True, reverse=True)
        except git.GitCommandError:
            reversed_ok = False
        else:
            reversed_ok = True
        by_id = self._patch_id_match(info["diff"], patch.files)
        if not reversed_ok and by_id is None:
            return None
        commit = by_id or self._introducing_commit(info["diff"], patch.files)
        how = "reverse-applies" if reversed_ok else "an upstream commit has its patch-id"
        where = f"; introduced by {commit}" if commit else ""
        return f"already in {self.onto} ({how}{where})", commit

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
        result.range_diff = gitlayer.range_diff(
            ws.repo,
            f"{result.old_commit}..{result.old_head}",
            f"{result.onto_commit}..{result.new_head}",
        )
    return result


# --- writing a line ----------------------------------------------------------------------------


def _sweep_staging(root: Path) -> None:
    """Undo what an interrupted ``--write`` left in ``patches/`` (under the bundle lock-free)."""
    for leftover in sorted(root.glob(f"{_STAGING_PREFIX}old-*")):
        name = leftover.name[len(f"{_STAGING_PREFIX}old-") :].rsplit("-", 1)[0]
        if not (root / name).exists():
            log.warning("mla-seam: restoring %s from an interrupted --write", name)
            os.rename(leftover, root / name)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f"{_STAGING_PREFIX}new-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def install_line(staged: Path, target: Path) -> Dict[str, List[str]]:
    """Move the validated line folder ``staged`` to ``target`` (``patches/<line>``) in one rename.

    Returns:
        ``{"unchanged": [...], "changed": [...], "added": [...], "removed": [...]}`` file names.
    """
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep_staging(root)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if target.is_dir() else {}
    after = {p.name: p.read_bytes() for p in staged.iterdir()}
    delta = {
        "unchanged": sorted(n for n in after if before.get(n) == after[n]),
        "changed": sorted(n for n in after if n in before and before[n] != after[n]),
        "added": sorted(n for n in after if n not in before),
        "removed": sorted(n for n in before if n not in after),
    }
    new = root / f"{_STAGING_PREFIX}new-{target.name}-{os.getpid()}"
    old = root / f"{_STAGING_PREFIX}old-{target.name}-{os.getpid()}"
    try:
        shutil.copytree(staged, new)
        crash_point("rebase-staged")
        with _signals_blocked():  # the two renames happen together or not at all
            if target.exists():
                os.rename(target, old)
            os.rename(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return delta


def _releases_of_line(ws: Workspace, version: str, only: Optional[Sequence[str]]) -> List[str]:
    if only:
        return sorted(set(only) | {version}, key=releases.version_key)
    line = releases.line_of(version)
    known = [v for v in upstream.RELEASES if upstream.line_of(v) == line]
    return sorted(set(known) | {version}, key=releases.version_key)


def _upstream_record(ws: Workspace, onto: str, commit: str, version: str) -> Dict[str, str]:
    message = gitlayer.commit_message(ws.repo, commit)
    if message.startswith(f"megatron-core {version} from PyPI sdist"):
        source = f"pypi-sdist megatron-core=={version}"
    else:
        source = f"git {onto}"
    tag = onto if onto.startswith(upstream.TAG_PREFIX) else f"{upstream.TAG_PREFIX}{version}"
    return {"tag": tag, "commit": commit, "source": source}


def export_line(
    ws: Workspace,
    base: str,
    head: str,
    onto: str,
    version: str,
    out_dir: Path,
    only: Optional[Sequence[str]] = None,
) -> Series:
    """Export ``base..head`` of the workspace as a line folder at ``out_dir`` (validated).

    Every release of the line other than ``version`` is recorded with its own pre-images
    (fetched from the cache where the checkout lacks its tag).
    """
    wanted = _releases_of_line(ws, version, only)
    extra = {}
    for release in wanted:
        if release != version:
            extra[release] = ws.resolve(upstream.tag_for(release))[0]
    overlay = paths.overlay_dir() / paths.ADAPTER_RELPATH
    return write_series(
        ws.repo,
        base,
        head,
        out_dir,
        releases.line_of(version),
        wanted,
        _upstream_record(ws, onto, base, version),
        {paths.ADAPTER_RELPATH: overlay},
        extra_bases=extra,
    )


# --- refreshing the overlay blob ---------------------------------------------------------------


def refresh_overlay(root: Path, check: bool) -> List[str]:
    """Record the current overlay's blob id in every line's manifest; return the stale lines.

    Only the manifest's ``overlay`` entry changes, and only where it differs; the JSON is written
    with the manifest's own deterministic layout, so a second run changes nothing.
    """
    overlay = paths.overlay_dir()
    blob = gitlayer.hash_blobs(overlay, [paths.ADAPTER_RELPATH])[paths.ADAPTER_RELPATH]
    if blob is None:
        raise SeriesCorruptError(f"{overlay / paths.ADAPTER_RELPATH} is missing", "restore it")
    stale = []
    for line_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        load_series(line_dir)
        manifest_path = line_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_bytes())
        if manifest.get("overlay") == {paths.ADAPTER_RELPATH: blob}:
            continue
        stale.append(line_dir.name)
        if not check:
            manifest["overlay"] = {paths.ADAPTER_RELPATH: blob}
            replace_atomic(manifest_path, json_bytes(manifest))
            load_series(line_dir)
    return stale


# --- the verb ----------------------------------------------------------------------------------


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


def _pick_series(root: Path, version: str, forced: Optional[str]) -> Series:
    if forced:
        return series_by_name(forced, root)
    return series_for(load_lines(root, strict=False), version)[0]


def _user_repo(megatron: Path) -> Tuple[MegatronTree, git.Repo]:
    tree = MegatronTree.resolve(megatron)
    if tree.repo is None:
        raise RebaseError(
            f"{tree.root} is not a git checkout: rebase needs the upstream tags",
            "clone Megatron-LM with its tags, or make a checkout from the sdists: "
            "mla-seam upstream get --into NEW_DIR core_v0.16.1 core_v0.17.1",
        )
    dirty = gitlayer.modified_tracked(tree.repo, "megatron")
    if dirty:
        raise DirtyTreeError(
            f"{tree.root} has uncommitted changes under megatron/ ({', '.join(dirty[:4])}"
            f"{', ...' if len(dirty) > 4 else ''})",
            "rebase reads committed tags only and would ignore them: commit or stash them "
            "(if the series is applied: mla-seam apply --revert DIR)",
        )
    return tree, tree.repo


def _report(s: Survey) -> None:
    _emit(
        f"mla-seam rebase: {s.series.name} (base {s.old_tag}) onto {s.onto} "
        f"(megatron-core {s.onto_version}, {s.onto_commit[:12]}, from {s.onto_source})"
    )
    _emit(f"  history: {s.history_note}")
    for p in s.patches:
        _emit(f"  {p.hook:<3} {p.name}: {p.cls.value}: {p.detail}")
    changes = s.changes
    _emit(f"contracts {s.old_tag} -> {s.onto}: {len(changes) or 'no'} change(s)")
    for change in changes:
        _emit(f"  {change.describe()}")
    for problem in contracts.adapter_problems(s.new_contracts):
        _emit(f"  adapter needs work: {problem}")
    if s.range_diff.strip():
        _emit("range-diff (old series vs new):")
        for line in s.range_diff.rstrip().splitlines():
            _emit(f"  {line}")
    counts = ", ".join(f"{n} {c}" for c, n in s.counts().items() if n)
    _emit(f"result: {counts}")


def _keep_notes(ws: Workspace, s: Survey) -> None:
    gitlayer.checkout_branch(ws.repo, REBASE_BRANCH, s.new_head)
    notes = gitlayer.git_dir(ws.repo) / KEEP_NOTES
    notes.mkdir(exist_ok=True)
    for p in s.conflicts:
        patch = s.series.line_dir / p.name
        info = gitlayer.mailinfo(patch.read_bytes(), ws.root)
        message = info["subject"] + "\n" + ("\n" + info["body"] if info["body"] else "")
        (notes / f"{p.name}.msg").write_text(message, encoding="utf-8")
        shutil.copyfile(patch, notes / p.name)
    (notes / "survey.json").write_bytes(json_bytes(s.to_json()))
    _emit(f"kept: {ws.root} (branch {REBASE_BRANCH} = {s.onto} + carried patches)")
    for p in s.conflicts:
        _emit(
            f"  write {p.hook} by hand there, then: git commit -a -F "
            f".git/{KEEP_NOTES}/{p.name}.msg  (original patch: .git/{KEEP_NOTES}/{p.name})"
        )
    _emit(
        f"  then: mla-seam rebase --megatron {ws.root} --onto {s.onto} --from {s.series.line} "
        f"--resolved {REBASE_BRANCH} --write"
    )


def _resolved_report(ws: Workspace, s: Survey, head: str) -> List[Dict[str, str]]:
    """Each commit of ``onto..head``: ``as surveyed`` (same patch-id as the survey's) or by hand."""
    touched = sorted({f for p in s.series.patches for f in p.files} | _files(ws, s, head))
    surveyed = set(gitlayer.commit_patch_ids(ws.repo, f"{s.onto_commit}..{s.new_head}", touched))
    resolved = gitlayer.commit_patch_ids(ws.repo, f"{s.onto_commit}..{head}", touched)
    by_commit = {sha: pid for pid, sha in resolved.items()}
    rows = []
    for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{head}"):
        how = "as surveyed" if by_commit.get(sha) in surveyed else "written by hand"
        rows.append({"commit": sha, "subject": gitlayer.commit_subject(ws.repo, sha), "how": how})
    return rows


def _files(ws: Workspace, s: Survey, head: str) -> Set[str]:
    return {
        path
        for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{head}")
        for _, path in gitlayer.changed_paths(ws.repo, sha)
    }


def _resolved_head(ws: Workspace, tree_repo: git.Repo, ref: str, s: Survey) -> str:
    commit = gitlayer.resolve_commit(tree_repo, ref)
    if commit is None:
        raise UsageError(
            f"--resolved {ref}: no such ref in the checkout", "name a branch or commit"
        )
    if not gitlayer.is_ancestor(ws.repo, s.onto_commit, commit):
        raise RebaseError(
            f"--resolved {ref} does not descend from {s.onto}",
            f"commit the hooks on top of {s.onto} (branch {REBASE_BRANCH} of a --keep folder)",
        )
    for sha in gitlayer.rev_list(ws.repo, f"{s.onto_commit}..{commit}"):
        bad = [f"{st} {p}" for st, p in gitlayer.changed_paths(ws.repo, sha) if st != "M"]
        if bad:
            raise RebaseError(
                f"commit {sha[:12]} of --resolved does more than edit files: {', '.join(bad)}",
                "hooks only edit upstream files in place; new files belong in overlay/",
            )
    return commit


def _write(ws: Workspace, s: Survey, head: str, args: argparse.Namespace, root: Path) -> None:
    version = s.onto_version
    target = root / releases.line_dir_name(releases.line_of(version))
    if head == s.onto_commit:
        raise RebaseError(
            f"no patch is left for {target.name}: every hook is upstream or obsolete on {s.onto}",
            "nothing to write; if that is right, the line needs no series (the adapter alone)",
        )
    with tempfile.TemporaryDirectory(prefix="mla-seam-export-") as tmp:
        staged = Path(tmp) / target.name
        only = args.releases.split(",") if args.releases else None
        try:
            export_line(ws, s.onto_commit, head, s.onto, version, staged, only)
        except PatchFailedError as err:
            raise RebaseError(
                f"the new {target.name} series does not serve every release of the line: "
                f"{err.message}",
                "give that release its own base (rebase --onto it), or list the releases the "
                "line serves with --releases",
            ) from None
        crash_point("rebase-exported")
        delta = install_line(staged, target)
    _emit(
        f"wrote {target}: {len(delta['unchanged'])} file(s) unchanged (bytes kept), "
        f"{len(delta['changed'])} changed, {len(delta['added'])} added, "
        f"{len(delta['removed'])} removed"
    )
    for kind in ("changed", "added", "removed"):
        for name in delta[kind]:
            _emit(f"  {kind}: {name}")


def _check_writable(s: Survey, args: argparse.Namespace) -> None:
    if args.resolved:
        return
    if s.conflicts:
        names = ", ".join(f"{p.hook} {p.name}" for p in s.conflicts)
        raise RebaseError(
            f"{len(s.conflicts)} patch(es) conflict on {s.onto}: {names}; nothing written",
            "write those hooks by hand: re-run with --keep PATH, commit them there, then "
            "--megatron PATH --resolved mla-seam/rebase --write (patches/README.md)",
        )
    if args.write and s.three_way and not args.accept_three_way:
        names = ", ".join(f"{p.hook} {p.name}" for p in s.three_way)
        raise RebaseError(
            f"{len(s.three_way)} patch(es) needed a 3-way merge: {names}; nothing written",
            "review the range-diff above, then re-run with --accept-three-way",
        )


def _run_rebase(args: argparse.Namespace) -> int:
    root = paths.patches_dir()
    if args.refresh_overlay:
        stale = refresh_overlay(root, args.check)
        verb = "stale" if args.check else "refreshed"
        _emit(f"mla-seam rebase --refresh-overlay: {verb}: {', '.join(stale) or 'none'}")
        if args.check and stale:
            raise RebaseError(
                f"the overlay blob recorded by {', '.join(stale)} is not the overlay's",
                "run `mla-seam rebase --refresh-overlay` and commit the manifests",
            )
        return 0
    if not args.megatron or not args.onto:
        raise UsageError("--megatron and --onto are required", "see mla-seam rebase --help")
    tree, user = _user_repo(Path(args.megatron))
    keep = Path(args.keep) if args.keep else None
    with Workspace.create(tree.root, keep) as ws:
        onto_commit, _ = ws.resolve(args.onto)
        version = version_at(ws.repo, onto_commit)
        series = _pick_series(root, version, args.from_line)
        s = survey(ws, series, args.onto)
        head = s.new_head
        resolved: List[Dict[str, str]] = []
        if args.resolved:
            head = _resolved_head(ws, user, args.resolved, s)
            s.range_diff = gitlayer.range_diff(
                ws.repo, f"{s.old_commit}..{s.old_head}", f"{s.onto_commit}..{head}"
            )
            resolved = _resolved_report(ws, s, head)
        crash_point("rebase-surveyed")
        _report(s)
        if resolved:
            _emit(f"resolved ({args.resolved}): the new series is {s.onto}..{args.resolved}")
            for row in resolved:
                _emit(f"  {row['commit'][:12]} {row['subject']}: {row['how']}")
        if args.json:
            Path(args.json).write_bytes(json_bytes(dict(s.to_json(), resolved=resolved)))
        if keep is not None:
            _keep_notes(ws, s)
        _check_writable(s, args)
        if args.write:
            _write(ws, s, head, args, root)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread the way SIGINT raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    """Run the verb; SIGINT/SIGTERM unwind (the scratch repository is removed on the way)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_rebase(args)
    except (KeyboardInterrupt, _Terminated) as exc:
        name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        err = InterruptedRunError(
            f"interrupted by {name}: the scratch repository was removed and the checkout was "
            "not written; patches/ holds the old line folder or the whole new one, never a mix",
            "run the command again",
        )
        err.exit_code = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
        raise err from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rebase`` verb to the CLI."""
    parser = subparsers.add_parser(
        "rebase",
        help="survey (and with --write export) a hook series on another upstream tag",
        description=(
            "Try every patch of a release line on TAG in a scratch clone of DIR and classify it "
            "(exact, offset, three_way, conflict, upstream, obsolete); report contract drift and "
            "a range-diff. DIR and patches/ are untouched unless --write (patches/ only)."
        ),
    )
    parser.add_argument("--megatron", metavar="DIR", help="git checkout of Megatron-LM (clean)")
    parser.add_argument("--onto", metavar="TAG", help="tag (or ref) of the new upstream base")
    parser.add_argument(
        "--from",
        dest="from_line",
        metavar="LINE",
        help="release line to start from (core_v0.16 or 0.16); default: the line serving TAG, "
        "else the newest older line",
    )
    parser.add_argument(
        "--write", action="store_true", help="export the new series into patches/<line>/"
    )
    parser.add_argument(
        "--accept-three-way",
        action="store_true",
        help="with --write: carry patches that needed a 3-way merge (after review)",
    )
    parser.add_argument(
        "--keep",
        metavar="PATH",
        help=f"keep the scratch repository at PATH (branch {REBASE_BRANCH}) to write hooks by hand",
    )
    parser.add_argument(
        "--resolved",
        metavar="REF",
        help="export TAG..REF of DIR (hooks written by hand) instead of the survey's result",
    )
    parser.add_argument(
        "--releases",
        metavar="V,V",
        help="releases the written line serves (default: every known release of TAG's line)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the survey as JSON")
    parser.add_argument(
        "--refresh-overlay",
        action="store_true",
        help="record the current overlay blob in every line's manifest (after adapter edits)",
    )
    parser.add_argument(
        "--check", action="store_true", help="with --refresh-overlay: only report stale lines"
    )
    parser.set_defaults(func=run)
