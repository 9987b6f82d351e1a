"""The moving targets of the nightly job and what each one needs.

A target is something upstream moves that the series must follow:

* ``release``: a ``core_vX.Y.Z`` tag of a final release no series lists (a new release);
* ``branch``: a branch the job follows (``--follow main,dev``; swept as ``upstream-<branch>``);
* ``overlay``: a release a series lists whose patches, pre-images or contracts fail now (the
  series no longer does what it claims: the overlay broke, not upstream).

:func:`plan` gives each target an action: ``propose`` (every hook carries, exact, offset or a
clean 3-way merge, and the adapter handles every contract: ``rebase --write
--accept-three-way`` writes the series, a pull request carries it), ``human`` (a conflict, a
contract the adapter does not handle, or a branch whose version belongs to a line that serves
releases: a tracking issue names the hunk, the culprits and the command that finishes the port),
or ``ok`` (nothing to write). Fingerprints (:func:`digest`) say when a proposal, an issue or a
GPU run would differ from the last night's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mla_seam import contracts, releases
from mla_seam.series import Series

BRANCH_PREFIX = "upstream-"
CARRIED = ("exact", "offset", "three_way")
DROPPED = ("upstream", "obsolete")
PROPOSAL_BRANCH = "mla-seam/propose/{slug}"


def branch_ref(branch: str) -> str:
    """Where a followed branch lands in the clone (``main`` -> ``upstream-main``)."""
    return f"{BRANCH_PREFIX}{branch}"


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
    branches = {branch_ref(b): b for b in follow}
    found = []
    for entry in report["tags"]:
        tag, version = str(entry["tag"]), str(entry["version"])
        if tag in branches:
            kind, name = "branch", branches[tag]
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
    if target.kind == "branch":
        owner = _line_serving_releases(target, lines)
        if owner is not None:
            target.action = "human"
            target.reasons.insert(
                0,
                f"{target.name} says megatron-core {target.version}, a version of the "
                f"{owner.name} series, which serves the releases {', '.join(owner.releases)}: "
                f"the nightly does not write {target.name}'s series over theirs; port it by "
                "hand (a series of its own per branch is planned)",
            )
            return target
        if entry["verdict"] == "supported":
            target.action = "ok"
            return target
    target.action = "propose"
    return target


def _line_serving_releases(target: Target, lines: Sequence[Series]) -> Optional[Series]:
    """The series of the branch's line when it serves a release other than the branch's own
    version (writing the branch's series there would break those releases)."""
    for s in lines:
        if s.line == target.line and any(v != target.version for v in s.releases):
            return s
    return None


def proposal_digest(files: Mapping[str, bytes]) -> str:
    """Fingerprint of a proposed line folder: the patches and the manifest without its
    ``upstream`` record (the target commit it was exported from moves with every upstream
    commit; the patches' bytes move only when a hooked file does)."""
    parts = {}
    for name, data in sorted(files.items()):
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("upstream", None)
            parts[name] = digest(manifest)
        else:
            parts[name] = hashlib.sha256(data).hexdigest()
    return digest(parts)


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
