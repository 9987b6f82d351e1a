"""Forks: the hunks of a patch against a fork's files, and explaining a refusal.

A fork's touched files differ from every recorded pre-image; :mod:`mla_seam.patching` runs the
series on them patch by patch. This module reads a patch's hunks (:func:`hunks_of`), tells a
hunk the fork already holds verbatim (:func:`already_in`) and the fork commit that added it
(:func:`commit_adding`), writes a patch without some hunks (:func:`without_hunks`), and, when a
hunk's context is gone, builds the refusal (:func:`conflict_error`): the file, the patch and
hunk, the release lines the fork changed there and the fork's commits that changed them
(``git log -L`` from the commit where the file left the release's content).

It also serves the revert's fallbacks for pristine bytes: the series run backwards
(:func:`reverse_series`) and the cached release checkouts (:func:`cached_release_repos`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import git
from mla_seam import gitlayer
from mla_seam.errors import PreimageMismatchError, SeamError
from mla_seam.series import PatchResult, Series, apply_patches

_HUNK_RE = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


@dataclasses.dataclass(frozen=True)
class Hunk:
    """One hunk of a patch: where it sits in the file it was made for, its old and new side."""

    number: int  # 1-based within its file in its patch
    start: int  # first old-side line (1-based)
    count: int
    header: str  # "@@ -120,7 +120,8 @@ def __init__"
    old: Tuple[bytes, ...]  # context and removed lines, in order
    new: Tuple[bytes, ...] = ()  # context and added lines, in order
    added: Tuple[bytes, ...] = ()  # the added lines only
    span: Tuple[int, int] = (0, 0)  # the hunk's lines in the patch text (header .. last body)


def hunks_of(data: bytes) -> Dict[str, List[Hunk]]:
    """The hunks of a (validated) format-patch, per file."""
    result: Dict[str, List[Hunk]] = {}
    current: Optional[str] = None
    lines = data.split(b"\n")
    i = 0
    while i < len(lines):
        raw = lines[i]
        if raw.startswith(b"diff --git "):
            current = raw.split(b" b/", 1)[-1].decode("utf-8")
            result.setdefault(current, [])
        match = _HUNK_RE.match(raw) if current else None
        if match:
            first = i
            start, count = int(match.group(1)), int(match.group(2) or 1)
            new_count = int(match.group(4) or 1)
            old: List[bytes] = []
            new: List[bytes] = []
            added: List[bytes] = []
            left_old, left_new = count, new_count
            i += 1
            while i < len(lines) and (left_old > 0 or left_new > 0 or lines[i][:1] == b"\\"):
                body = lines[i]
                tag = body[:1]
                if tag in (b" ", b""):
                    old.append(body[1:])
                    new.append(body[1:])
                    left_old, left_new = left_old - 1, left_new - 1
                elif tag == b"-":
                    old.append(body[1:])
                    left_old -= 1
                elif tag == b"+":
                    new.append(body[1:])
                    added.append(body[1:])
                    left_new -= 1
                i += 1
            hunks = result[current]
            header = raw.decode("utf-8", errors="replace")
            hunks.append(
                Hunk(len(hunks) + 1, start, count, header, tuple(old), tuple(new), tuple(added),
                     (first, i))  # fmt: skip
            )
            continue
        i += 1
    return result


def without_hunks(data: bytes, drop: Iterable[Tuple[str, int]]) -> bytes:
    """The patch ``data`` with the hunks ``(file, number)`` left out (a file left without any
    hunk loses its diff header too). Later hunks keep their old-side line numbers: ``git apply``
    finds them at their offset."""
    dropped = set(drop)
    lines = data.split(b"\n")
    gone = set()
    for rel, hunks in hunks_of(data).items():
        for hunk in hunks:
            if (rel, hunk.number) in dropped:
                gone.update(range(*hunk.span))
    keep = [line for k, line in enumerate(lines) if k not in gone]
    out: List[bytes] = []
    k = 0
    while k < len(keep):  # drop the header block of a file left without hunks
        line = keep[k]
        if line.startswith(b"diff --git "):
            end = k + 1
            while end < len(keep) and not keep[end].startswith((b"diff --git ", b"@@ ")):
                if keep[end].startswith(b"-- ") or keep[end] == b"--":
                    break
                end += 1
            if end >= len(keep) or not keep[end].startswith(b"@@ "):
                k = end
                continue
        out.append(line)
        k += 1
    if out and out[-1] != b"":
        out.append(b"")  # the patch text ends with a newline
    return b"\n".join(out)


def contains(lines: Sequence[bytes], block: Sequence[bytes]) -> Optional[int]:
    """The 0-based index where ``block`` starts in ``lines``, or ``None``."""
    if not block:
        return 0
    first = block[0]
    n = len(block)
    for k in range(len(lines) - n + 1):
        if lines[k] == first and tuple(lines[k : k + n]) == tuple(block):
            return k
    return None


def already_in(lines: Sequence[bytes], hunk: Hunk) -> bool:
    """Whether the file (as ``lines``) already holds the hunk's result verbatim and not its
    old side: the fork made that change itself (a hook picked by hand)."""
    return (
        bool(hunk.added)
        and contains(lines, hunk.new) is not None
        and (contains(lines, hunk.old) is None)
    )


def commit_adding(repo: Optional[git.Repo], rel: str, hunk: Hunk) -> str:
    """``abc1234 (subject)`` of the newest commit in HEAD's history that added the hunk's lines
    to ``rel`` (``git log -S``), or ``""``."""
    if repo is None or not hunk.added:
        return ""
    needle = b"\n".join(hunk.added).decode("utf-8", errors="replace")
    try:
        rows = gitlayer.log_touching(repo, "HEAD", [rel], limit=1, needle=needle)
    except git.GitCommandError:
        return ""
    return f"{rows[0][0][:12]} ({rows[0][1]})" if rows else ""


@dataclasses.dataclass(frozen=True)
class HunkConflict:
    """A hunk whose old side the fork's file no longer contains."""

    patch: str
    rel: str
    hunk: Hunk


def _fork_lines(pristine: bytes, fork: bytes, start: int, count: int) -> Optional[Tuple[int, int]]:
    """The fork's lines (1-based, inclusive) that replaced release lines ``start..start+count``."""
    old, new = pristine.split(b"\n"), fork.split(b"\n")
    lo, hi = start - 1, start - 1 + count
    spans = []
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or i2 < lo or i1 > hi:
            continue
        spans.append((j1, j2))
    if not spans:
        return None
    first, last = min(j1 for j1, _ in spans), max(j2 for _, j2 in spans)
    if last <= first:  # only deletions: the lines around the gap
        first, last = max(first - 1, 0), min(first + 1, len(new))
    return first + 1, max(last, first + 1)


def _commits(
    repo: Optional[git.Repo], rel: str, pres: Iterable[str], lines: Tuple[int, int]
) -> List[Tuple[str, str]]:
    if repo is None:
        return []
    for pre in pres:
        base = gitlayer.last_commit_with_blob(repo, rel, pre)
        if base is None:
            continue
        parents = repo.commit(base).parents
        rev_range = f"{parents[0].hexsha}..HEAD" if parents else "HEAD"
        return gitlayer.commits_touching_lines(repo, rel, lines[0], lines[1], rev_range)
    return []


def conflict_error(
    series: Series,
    conflicts: Sequence[HunkConflict],
    sources: Dict[str, bytes],
    repo: Optional[git.Repo],
    pristine: Dict[str, Optional[bytes]],
) -> PreimageMismatchError:
    """The refusal for a fork whose changes reach into the series' hunks."""
    parts = []
    for c in conflicts:
        text = f"{c.rel}: {c.patch} hunk #{c.hunk.number} ({c.hunk.header.strip()})"
        original = pristine.get(c.rel)
        span = (
            _fork_lines(original, sources[c.rel], c.hunk.start, c.hunk.count)
            if original is not None
            else None
        )
        if span is not None:
            text += f": release lines {c.hunk.start}-{c.hunk.start + c.hunk.count - 1} are "
            text += (
                f"line {span[0]}" if span[0] == span[1] else f"lines {span[0]}-{span[1]}"
            ) + " of the fork, changed"
            pres = [img.pre for img in series.files.get(c.rel, ())]
            found = _commits(repo, c.rel, pres, span)
            if found:
                text += " by " + ", ".join(f"{short} ({subject})" for short, subject in found)
            elif repo is not None:
                text += " outside the history of HEAD"
        else:
            text += ": its context is not in the file"
        parts.append(text)
    return PreimageMismatchError(
        f"the fork changed lines the series needs as context ({len(conflicts)} hunk"
        f"{'s' if len(conflicts) != 1 else ''}): " + "; ".join(parts),
        "port the hook by hand on the fork (see the patch in the series folder), or try "
        "`mla-seam apply --3way` (a merge with conflicts is rolled back, never left in the tree); "
        "`mla-seam apply --check` lists every patch",
    )


# --- pristine bytes ------------------------------------------------------------------------


def cached_release_repos() -> List[git.Repo]:
    """The repositories of the release checkouts in mla-seam's cache (nothing is downloaded)."""
    from mla_seam import upstream  # pylint: disable=import-outside-toplevel

    folder = upstream.checkouts_dir()
    repos = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or not (entry / ".git").is_dir():
                continue
            try:
                repo = gitlayer.open_repo(entry)
            except SeamError:
                continue
            if repo is not None:
                repos.append(repo)
    return repos


def reverse_series(
    series: Series, sources: Dict[str, bytes], wanted: Dict[str, str]
) -> Dict[str, bytes]:
    """The series run backwards on ``sources``; the files whose result has the wanted blob."""
    with tempfile.TemporaryDirectory(prefix="mla-seam-reverse-") as tmp:
        work = Path(tmp)
        for rel, data in sources.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        results: List[PatchResult] = apply_patches(
            series.patches, work, label=series.name, reverse=True, stop_on_error=False
        )
        if not all(r.ok for r in results):
            return {}
        blobs = gitlayer.hash_blobs(work, sorted(sources))
        return {
            rel: (work / rel).read_bytes()
            for rel in sources
            if rel in wanted and blobs[rel] == wanted[rel]
        }
