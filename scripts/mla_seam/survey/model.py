"""The survey's report model: patch classes, hunks, culprit commits, and the :class:`Survey`.

Plain data with JSON forms (the ``rebase --json`` report and the drift schema's ``patches[]``);
no git here except :func:`split_hunks`, which reads a diff as text.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Dict, List, Optional, Tuple

from mla_seam import contracts
from mla_seam.series import Series

_HOOK_RE = re.compile(r"\bmla-seam (H\d+)\b")
_OFFSET_RE = re.compile(r"^Hunk #(\d+) succeeded at (\d+) \(offset (-?\d+) lines?\)\.$")


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
    history_base: Optional[str] = None  # the checkout's tag culprits are read from
    history_detail: str = ""  # why there is (no) history

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
        """Where culprits come from: commits between the line's tag and the target, whole
        releases, or nowhere (and why)."""
        if self.history:
            return (
                f"culprits are the upstream commits between {self.history_base} and {self.onto} "
                f"({self.history_detail})"
            )
        return f"no shared history between {self.old_tag} and {self.onto}: {self.history_detail}"

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
            "history_base": self.history_base,
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


def offsets_of(report: str) -> Tuple[int, ...]:
    return tuple(
        int(m.group(3)) for m in (_OFFSET_RE.match(ln.strip()) for ln in report.splitlines()) if m
    )
