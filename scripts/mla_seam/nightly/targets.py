"""The moving targets of the nightly job and what each one needs.

A target is something upstream moves that the series must follow:

* ``release``: a ``core_vX.Y.Z`` tag of a final release no series lists (a new release);
* ``branch``: a branch the job follows (``--follow main,dev``; swept as ``upstream-<branch>``,
  :func:`mla_seam.releases.followed_ref`);
* ``overlay``: a release a series lists whose patches, pre-images or contracts fail now (the
  series no longer does what it claims: the overlay broke, not upstream).

:func:`plan` gives each target an action: ``propose`` (every hook carries, exact, offset or a
clean 3-way merge, and the adapter handles every contract: ``rebase --write
--accept-three-way`` writes the series, a pull request carries it), ``human`` (a conflict, a
contract the adapter does not handle, or a followed branch that is no moving target and whose
version belongs to a line that serves releases: a tracking issue names the hunk, the culprits
and the command that finishes the port), or ``ok`` (nothing to write).

A followed branch that is one of the moving targets (:data:`mla_seam.releases.MOVING_TARGETS`:
main, dev) has a series of its own, ``patches/<branch>/``: its proposal updates that folder
(the rebase onto ``upstream-<branch>`` writes it, recording its snapshot ``main@<commit>``),
whatever its version string says; it is ``ok`` at the commit its series was made from, or when
the rebase writes what is checked in (:func:`folder_digest`). Fingerprints (:func:`digest`) say
when a proposal, an issue or a GPU run would differ from the last night's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mla_seam import contracts, releases
from mla_seam.series import Series

CARRIED = ("exact", "offset", "three_way")
DROPPED = ("upstream", "obsolete")
PROPOSAL_BRANCH = "mla-seam/propose/{slug}"


def digest(value: Any) -> str:
    """A short stable fingerprint of any JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class Target:
    """One moving target and what the night decided for it."""

    name: str  # core_v0.20.0, main, dev
    kind: str  # release | branch | overlay
    ref: str  # the ref swept in the clone (tag, upstream-main)
    commit: str
    version: str
    line: str
    series: str  # the series surveyed (serving it, or the one a rebase starts from)
    action: str = "ok"  # propose | human | ok
    reasons: List[str] = dataclasses.field(default_factory=list)
    classes: Dict[str, str] = dataclasses.field(default_factory=dict)
    proposal: Optional[Dict[str, Any]] = None
    issue: Optional[Dict[str, Any]] = None
    gpu: Optional[Dict[str, Any]] = None
    note: str = ""  # why an ``ok`` moving target needs nothing tonight

    @property
    def slug(self) -> str:
        """A name safe for folders and branch names."""
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in self.name)

    @property
    def branch(self) -> str:
        """The proposal's branch in the project's repository."""
        return PROPOSAL_BRANCH.format(slug=self.slug)

    @property
    def onto(self) -> str:
        """What a human passes to ``rebase --onto`` in a clone of upstream."""
        return self.name

    @property
    def label(self) -> str:
        """``core_v0.20.0`` / ``upstream main``."""
        return f"upstream {self.name}" if self.kind == "branch" else self.name

    @property
    def moving(self) -> Optional[str]:
        """The moving target this is (``main``, ``dev``: a series folder of its own), else
        ``None``."""
        return releases.moving_target(self.ref) if self.kind == "branch" else None

    @property
    def folder(self) -> str:
        """The series folder a proposal writes: ``main`` for upstream main, ``core_v0.20`` for
        a release of that line (:func:`mla_seam.releases.series_folder`)."""
        return releases.series_folder(self.ref, self.version)

    def to_json(self) -> Dict[str, Any]:
        """The ``targets.json`` entry."""
        data = dataclasses.asdict(self)
        data["slug"], data["branch"] = self.slug, self.branch
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Target":
        """Read a ``targets.json`` entry back."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def moving_targets(
    report: Mapping[str, Any], follow: Sequence[str], lines: Sequence[Series]
) -> List[Target]:
    """The targets of one drift report (see the module doc), in the report's order."""
    listed = {v for s in lines for v in s.releases}
    found = []
    for entry in report["tags"]:
        tag, version = str(entry["tag"]), str(entry["version"])
        branch = releases.followed_branch(tag)
        if branch is not None and branch in follow:
            kind, name = "branch", branch
        elif not tag.startswith(releases.TAG_PREFIX) or releases.is_prerelease(version):
            continue
        elif version not in listed and releases.version_of_tag(tag) not in listed:
            kind, name = "release", tag  # (upstream's core_v0.19.0 says 0.19.1: listed by tag)
        elif _own_reasons(entry):
            kind, name = "overlay", tag
        else:
            continue
        found.append(
            Target(
                name=name,
                kind=kind,
                ref=tag,
                commit=str(entry["commit"]),
                version=version,
                line=str(entry["line"]),
                series=str(entry["series"]),
                reasons=list(entry["reasons"]),
                classes={p["hook"]: p["class"] for p in entry["patches"]},
            )
        )
    return found


def _own_reasons(entry: Mapping[str, Any]) -> List[str]:
    return [r for r in entry["reasons"] if not str(r).startswith("GPU (")]


def plan(target: Target, entry: Mapping[str, Any], lines: Sequence[Series]) -> Target:
    """Set ``target.action`` (and, for ``human``, the reasons a human has to act on)."""
    classes = set(target.classes.values())
    problems = contracts.adapter_problems(entry["contracts"])
    if target.kind == "overlay":
        target.action = "human"
        return target
    if "conflict" in classes or problems:
        target.action = "human"
        return target
    if target.moving is not None:
        own = own_series(target, lines)
        made_from = str(own.upstream.get("commit") or "") if own is not None else ""
        if target.series == target.moving and made_from == target.commit:
            target.action = "ok"  # the commit its series was made from: nothing to port
            return target
        target.action = "propose"  # ok after all when the rebase writes what is checked in
        return target
    if target.kind == "branch":
        owner = _line_serving_releases(target, lines)
        if owner is not None:
            target.action = "human"
            target.reasons.insert(
                0,
                f"{target.name} says megatron-core {target.version}, a version of the "
                f"{owner.name} series, which serves the releases {', '.join(owner.releases)}: "
                f"the nightly does not write {target.name}'s series over theirs, and "
                f"{target.name} is no moving target with a series of its own (those are "
                f"{', '.join(releases.MOVING_TARGETS)}); port it by hand",
            )
            return target
        if entry["verdict"] == "supported":
            target.action = "ok"
            return target
    target.action = "propose"
    return target


def own_series(target: Target, lines: Sequence[Series]) -> Optional[Series]:
    """The checked-in series of a moving target (``patches/main``), if there is one."""
    return next((s for s in lines if target.moving and s.name == target.moving), None)


def _line_serving_releases(target: Target, lines: Sequence[Series]) -> Optional[Series]:
    """The series of the branch's line when it serves a release other than the branch's own
    version (writing the branch's series there would break those releases)."""
    for s in lines:
        if s.line == target.line and any(v != target.version for v in s.releases):
            return s
    return None


def proposal_digest(files: Mapping[str, bytes]) -> str:
    """Fingerprint of a proposed series folder: the patches and the manifest without its
    ``upstream`` record and with a moving target's snapshot reduced to its name (``main@`` for
    ``main@d98e8a64dd``): the commit it was exported from moves with every upstream commit; the
    patches' bytes and the recorded images move only when a hooked file does."""
    parts = {}
    for name, data in sorted(files.items()):
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("upstream", None)
            parts[name] = digest(_without_snapshots(manifest))
        else:
            parts[name] = hashlib.sha256(data).hexdigest()
    return digest(parts)


def _without_snapshots(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_snapshots(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_snapshots(v) for v in value]
    if isinstance(value, str):
        parsed = releases.parse_snapshot(value)
        return f"{parsed[0]}@" if parsed else value
    return value


def folder_digest(folder: Path) -> Optional[str]:
    """:func:`proposal_digest` of a series folder on disk (``None``: there is none)."""
    if not folder.is_dir():
        return None
    return proposal_digest({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def issue_digest(target: Target, entry: Mapping[str, Any]) -> str:
    """Fingerprint of what a tracking issue says: classes, reasons without commit ids that
    move with every upstream commit, hunks and culprits."""
    hunks = [
        (p["hook"], h["file"], h["hunk"], [c["commit"] for c in h["culprits"]])
        for p in entry["patches"]
        for h in p.get("hunks") or []
    ]
    reasons = [r for r in target.reasons if not r.startswith("GPU (")]
    return digest([target.action, target.classes, reasons, hunks])
