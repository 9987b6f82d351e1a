"""Running a series on a tree's files, patch by patch: strictly, past hunks the fork already
holds, or merged 3-way against the release's own files.

Every patch is one :class:`Step`, tried in this order:

1. strictly (``git apply``: exact context, offsets allowed, never fuzz);
2. a hunk the file already holds verbatim (its result there, its old side gone: a hook the fork
   picked by hand) is left out, ``already in the fork: commit X``; the rest applies strictly. A
   patch whose every hunk is there changes nothing;
3. with ``--3way``: each file of the patch merged (``git merge-file``) from the fork's bytes,
   the release's file before the patch (the base) and after it. The base is the recorded
   pre-image closest to the fork, from the tree's repository or the release's sdist
   (:mod:`mla_seam.preimages`, every byte checked against its blob id), so any clone depth, any
   tag of the line and plain folders work alike; a merge with conflicts fails the step, and
   nothing is kept;
4. otherwise the step fails, naming the hunks whose context the fork changed.

Files are handled in "patch form": their committed form with uniform CRLF line endings turned
into LF (:func:`to_patch_form`), so a hook file committed with CRLF is patched like the release.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import git
from mla_seam import forks, gitlayer, preimages
from mla_seam.errors import SeriesCorruptError
from mla_seam.record import InFork
from mla_seam.series import Offset, PatchEntry, Series, _parse_offsets


def crlf(data: bytes) -> bool:
    """Whether every line of ``data`` ends with CRLF (and there is at least one)."""
    return b"\r\n" in data and data.count(b"\n") == data.count(b"\r\n")


def to_patch_form(data: bytes, is_crlf: bool) -> bytes:
    """The bytes the patches are made for: CRLF endings turned into LF where the file has them."""
    return data.replace(b"\r\n", b"\n") if is_crlf else data


def from_patch_form(data: bytes, is_crlf: bool) -> bytes:
    """The inverse of :func:`to_patch_form`."""
    return data.replace(b"\n", b"\r\n") if is_crlf else data


@dataclasses.dataclass
class Step:
    """What one patch did: how, where it moved, which hunks the fork already held."""

    patch: PatchEntry
    how: str  # exact | offset | in-fork | partly-in-fork | 3way | failed
    files: Dict[str, bytes]  # the patch's files after this step (patch form)
    offsets: Tuple[Offset, ...] = ()
    in_fork: Tuple[InFork, ...] = ()
    conflicts: Tuple[forks.HunkConflict, ...] = ()
    report: str = ""  # why a 3-way merge failed
    effective: Optional[bytes] = None  # the patch text applied strictly (None: merged, skipped)

    @property
    def ok(self) -> bool:
        return self.how != "failed"

    def describe(self) -> List[str]:
        """``--check`` lines for this step."""
        text = {
            "exact": "applies exactly",
            "offset": "applies with offsets",
            "in-fork": "already in the fork (every hunk): skipped",
            "partly-in-fork": "applies; some hunks are already in the fork (skipped)",
            "3way": "merged 3-way without conflicts (review the hunks)",
            "failed": "fails",
        }[self.how]
        if self.how == "failed" and self.report:
            text += f": {self.report}"
        lines = [f"  patch {self.patch.name}: {text}"]
        lines += [f"    offset: {o}" for o in self.offsets]
        lines += [f"    {in_fork_text(h)}" for h in self.in_fork]
        lines += [
            f"    context changed by the fork: {c.rel} hunk #{c.hunk.number} "
            f"({c.hunk.header.strip()})"
            for c in self.conflicts
        ]
        return lines


def in_fork_text(hunk: InFork) -> str:
    """``already in the fork: 0003-...patch hunk #1 of FILE (commit abc (subject))``."""
    commit = f" (commit {hunk.commit})" if hunk.commit else ""
    return f"already in the fork: {hunk.patch} hunk #{hunk.hunk} of {hunk.file}{commit}"


class _Bases:
    """The release's files before and after each patch, for 3-way merges (built on demand)."""

    def __init__(
        self, series: Series, sources: Dict[str, bytes], repos: Sequence[git.Repo], tmp: Path
    ) -> None:
        self.series, self.sources, self.repos = series, sources, repos
        self.root = tmp / "bases"
        self.done = -1  # index of the last patch applied to the bases
        self.release: Dict[str, str] = {}

    def _start(self) -> None:
        choices = {rel: [img.pre for img in self.series.files[rel]] for rel in self.sources}
        found = preimages.need(self.series, choices, self.repos, "--3way")
        for rel, blobs in choices.items():
            have = [b for b in blobs if b in found]
            lines = collections.Counter(self.sources[rel].split(b"\n"))
            best = min(
                have,
                key=lambda b: sum((lines - collections.Counter(found[b].split(b"\n"))).values()),
            )
            self.release[rel] = next(
                ", ".join(img.releases) for img in self.series.files[rel] if img.pre == best
            )
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(found[best])

    def around(self, index: int, patch: PatchEntry) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
        """The patch's files in the release before and after patch ``index``."""
        if self.done < 0:
            self._start()
        while self.done < index - 1:
            self.done += 1
            self._apply(self.series.patches[self.done])
        before = {rel: (self.root / rel).read_bytes() for rel in patch.files}
        self._apply(patch)
        self.done = index
        after = {rel: (self.root / rel).read_bytes() for rel in patch.files}
        return before, after

    def _apply(self, patch: PatchEntry) -> None:
        try:
            gitlayer.apply_patch(self.root, patch.path)
        except git.GitCommandError:
            raise SeriesCorruptError(
                f"{self.series.name}/{patch.name} does not apply to the release's own files",
                "the series and its pre-images disagree: reinstall mla-seam",
            ) from None


@contextlib.contextmanager
def _workspace(sources: Dict[str, bytes]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mla-seam-patch-") as tmp:
        work = Path(tmp) / "tree"
        for rel, data in sources.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        yield Path(tmp)


def run(
    series: Series,
    sources: Dict[str, bytes],
    three_way: bool,
    repo: Optional[git.Repo],
    repos: Sequence[git.Repo] = (),
    stages: bool = True,
) -> List[Step]:
    """Every patch of ``series`` on ``sources`` (patch form), in order; see the module doc.

    ``repo`` is the tree's repository (names the fork commits of hunks already there);
    ``repos`` (the tree's own first) are searched for ``--3way``'s pre-images before the
    releases' sdists (:func:`mla_seam.preimages.need`). Without ``stages``
    (nobody needs the files after each patch) a series that applies exactly as a whole is
    applied in one ``git apply``.
    """
    if not stages:
        whole = _whole(series, sources)
        if whole is not None:
            return whole
    steps: List[Step] = []
    with _workspace(sources) as tmp:
        work = tmp / "tree"
        bases = _Bases(series, sources, [r for r in (repo, *repos) if r is not None], tmp)
        for index, patch in enumerate(series.patches):
            step = _strict(work, patch, patch.path.read_bytes(), tmp)
            if step is None:
                step = _hunks(work, patch, repo, tmp)
            if step.how == "failed" and three_way:
                step = _merge(work, index, patch, bases, step)
            steps.append(step)
    return steps


def _whole(series: Series, sources: Dict[str, bytes]) -> Optional[List[Step]]:
    """Every patch in one ``git apply`` (all or nothing); ``None`` unless each hunk applies
    exactly where its patch says (then the steps would be the same one by one)."""
    with _workspace(sources) as tmp:
        work = tmp / "tree"
        try:
            report = gitlayer.apply_patch(work, [p.path for p in series.patches])
        except git.GitCommandError:
            return None
        if _parse_offsets("", report):
            return None
        steps = [Step(p, "exact", {}, effective=p.path.read_bytes()) for p in series.patches]
        steps[-1].files = _read(work, sorted(sources))
        return steps


def _read(work: Path, rels: Sequence[str]) -> Dict[str, bytes]:
    return {rel: (work / rel).read_bytes() for rel in rels if (work / rel).is_file()}


def _strict(work: Path, patch: PatchEntry, text: bytes, tmp: Path) -> Optional[Step]:
    path = tmp / f"{patch.name}.effective"
    path.write_bytes(text)
    try:
        report = gitlayer.apply_patch(work, path)
    except git.GitCommandError:
        return None
    offsets = _parse_offsets(patch.name, report)
    return Step(
        patch, "offset" if offsets else "exact", _read(work, patch.files), offsets,
        effective=text,
    )  # fmt: skip


def _hunks(work: Path, patch: PatchEntry, repo: Optional[git.Repo], tmp: Path) -> Step:
    """A patch that does not apply as a whole: hunks already in the fork are left out."""
    text = patch.path.read_bytes()
    present: List[Tuple[str, forks.Hunk]] = []
    failing: List[forks.HunkConflict] = []
    for rel, hunks in forks.hunks_of(text).items():
        lines = (work / rel).read_bytes().split(b"\n") if (work / rel).is_file() else []
        for hunk in hunks:
            if forks.already_in(lines, hunk):
                present.append((rel, hunk))
            elif forks.contains(lines, hunk.old) is None:
                failing.append(forks.HunkConflict(patch.name, rel, hunk))
    in_fork = tuple(
        InFork(patch.name, rel, hunk.number, forks.commit_adding(repo, rel, hunk))
        for rel, hunk in present
    )
    if present and not failing:
        total = sum(len(h) for h in forks.hunks_of(text).values())
        if len(present) == total:
            return Step(patch, "in-fork", _read(work, patch.files), in_fork=in_fork)
        rest = forks.without_hunks(text, [(rel, h.number) for rel, h in present])
        step = _strict(work, patch, rest, tmp)
        if step is not None:
            return dataclasses.replace(step, how="partly-in-fork", in_fork=in_fork)
    if not failing:  # every old side is there, yet git refuses: report every hunk
        failing = [
            forks.HunkConflict(patch.name, rel, h)
            for rel, hs in forks.hunks_of(text).items()
            for h in hs
            if (rel, h) not in present
        ]
    return Step(
        patch, "failed", _read(work, patch.files), in_fork=in_fork, conflicts=tuple(failing)
    )


def _merge(work: Path, index: int, patch: PatchEntry, bases: _Bases, failed: Step) -> Step:
    """``git merge-file`` of each file of the patch: the fork, the release before the patch and
    after it; nothing is written to ``work`` unless every file merges cleanly."""
    before, after = bases.around(index, patch)
    merged: Dict[str, bytes] = {}
    problems = []
    for rel in patch.files:
        ours = (work / rel).read_bytes()
        labels = ("fork", f"release {bases.release.get(rel, '')}".strip(), patch.name)
        data, conflicts = gitlayer.merge_file(ours, before[rel], after[rel], labels)
        if conflicts:
            problems.append(f"{rel}: {conflicts} conflict{'s' if conflicts != 1 else ''}")
        merged[rel] = data
    if problems:
        return dataclasses.replace(failed, report="; ".join(problems))
    for rel, data in merged.items():
        (work / rel).write_bytes(data)
    return Step(patch, "3way", merged, in_fork=failed.in_fork)


def final(sources: Dict[str, bytes], steps: Sequence[Step]) -> Dict[str, bytes]:
    """The files after every step (patch form)."""
    result = dict(sources)
    for step in steps:
        result.update(step.files)
    return result


def reverses(steps: Sequence[Step], new: Dict[str, bytes], sources: Dict[str, bytes]) -> bool:
    """Whether the strictly applied patches, reversed in reverse order, give ``sources`` back
    from ``new`` (a change that ``--revert`` could undo without the pristine store)."""
    with _workspace(new) as tmp:
        work = tmp / "tree"
        for k, step in enumerate(reversed(steps)):
            if step.effective is None:
                continue
            path = tmp / f"reverse-{k}.patch"
            path.write_bytes(step.effective)
            try:
                gitlayer.apply_patch(work, path, reverse=True)
            except git.GitCommandError:
                return False
        return _read(work, sorted(sources)) == sources
