"""The sweep: which refs a range names, and one survey plus contract probes per ref.

:func:`tags_in_range` turns ``FROM..TO`` into refs: every known release between the endpoints
(the built-in list plus ``include``, releases the package index reported), the checkout's own
``core_vX.Y.Z`` tags in that range, and TO itself when it is another ref (``main``).
Pre-releases (``rc``, ``.dev``, alpha/beta) are skipped unless ``include_pre``: a real clone
has 15 ``rc`` tags between 0.13 and 0.17, and an ``rc`` is not what the series serve.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mla_seam import __version__, contracts, gitlayer, releases, upstream
from mla_seam.drift import cache as entry_cache
from mla_seam.errors import SeamError, UsageError
from mla_seam.series import Series
from mla_seam.survey import (
    PatchClass,
    Survey,
    Workspace,
    series_for_ref,
    survey,
)

log = logging.getLogger(__name__)

SUPPORTED, NEEDS_WORK = "supported", "needs_work"
#: drift.json's schema version. 2: ``run`` (timestamp, cards, versions, pre-releases),
#: ``since_previous``, the ``gpu`` slot's object (GPU verdicts), ``summary.gpu_*``.
SCHEMA_VERSION = 2

# --- the range ---------------------------------------------------------------------------------


def known_releases(
    include: Sequence[str] = (), include_pre: bool = False, pre_after: Optional[str] = None
) -> List[str]:
    """The built-in releases plus ``include``, oldest first; pre-releases only on request
    (and with ``pre_after`` only those newer than that version: the upcoming ones)."""
    known = set(upstream.RELEASES) | {releases.version_of_tag(v) for v in include}
    return sorted(
        (v for v in known if _pre_ok(v, include_pre, pre_after)), key=releases.version_key
    )


def _pre_ok(version: str, include_pre: bool, pre_after: Optional[str]) -> bool:
    if not releases.is_prerelease(version):
        return True
    if not include_pre:
        return False
    return pre_after is None or releases.version_key(version) > releases.version_key(pre_after)


def _endpoint(text: str, first: bool, known: Sequence[str]) -> Optional[str]:
    """The release an endpoint names (a line means its oldest/newest release), else ``None``."""
    try:
        version = upstream.version_for(text)
    except SeamError:
        return None
    line = upstream.line_of(version)
    bare = text.strip().removeprefix(upstream.TAG_PREFIX).removeprefix("v")
    if bare.count(".") == 1:  # a line: from its first release, to its last
        members = [v for v in known if upstream.line_of(v) == line] or [version]
        return members[0] if first else members[-1]
    return version


def tags_in_range(
    ws: Workspace,
    spec: str,
    include: Sequence[str] = (),
    include_pre: bool = False,
    pre_after: Optional[str] = None,
    also: Sequence[str] = (),
) -> Tuple[List[str], List[str]]:
    """The refs a ``FROM..TO`` range names, oldest first, and the pre-release tags left out.

    Args:
        ws: The workspace (its tags are the checkout's).
        spec: ``FROM..TO``: tags, versions or lines; TO may be any ref of the checkout.
        include: Further releases to sweep (versions the package index reported).
        include_pre: Sweep pre-releases too (``--pre``).
        pre_after: With ``include_pre``, only pre-releases newer than this version.
        also: Further refs of the checkout to sweep after the range (branches such as dev).

    Raises:
        UsageError: the range is malformed or empty.
        UpstreamError: an endpoint is neither a known release nor a ref of the checkout.
    """
    start, sep, end = spec.partition("..")
    if not sep or not start or not end:
        raise UsageError(
            f"--tags {spec!r} is not FROM..TO", "e.g. --tags core_v0.13.1..core_v0.19.2"
        )
    known = known_releases(include, include_pre, pre_after)
    low, high = _endpoint(start, True, known), _endpoint(end, False, known)
    extra_end = None
    if low is None:
        ws.resolve(start)  # raises UpstreamError with the known releases
        low = ws.version_at(ws.resolve(start)[0])
    if high is None:
        commit, _ = ws.resolve(end)
        if end.startswith(upstream.TAG_PREFIX):
            high = ws.version_at(commit)  # a release tag of the checkout no list knows yet
        else:
            extra_end = end  # a branch: every tag from FROM on, then the branch
    versions = set(v for v in known if _in(v, low, high))
    skipped = []
    for tag in gitlayer.tags_at(ws.repo):
        version = tag.removeprefix(upstream.TAG_PREFIX)
        if not tag.startswith(upstream.TAG_PREFIX) or not _in(version, low, high):
            continue
        if not _pre_ok(version, include_pre, pre_after):
            skipped.append(tag)
        else:
            versions.add(version)
    refs = [f"{upstream.TAG_PREFIX}{v}" for v in sorted(versions, key=releases.version_key)]
    if extra_end:
        refs.append(extra_end)
    for ref in also:
        if ref not in refs:
            ws.resolve(ref)  # raises UpstreamError for a ref the checkout lacks
            refs.append(ref)
    if not refs:
        raise UsageError(f"--tags {spec}: no release in that range", "widen the range")
    return refs, sorted(skipped, key=lambda t: releases.version_key(releases.version_of_tag(t)))


def _in(version: str, low: str, high: Optional[str]) -> bool:
    key = releases.version_key(version)
    if key[0] != 0:
        return False
    return releases.version_key(low) <= key and (high is None or key <= releases.version_key(high))


# --- one tag -----------------------------------------------------------------------------------


def _preimage_problems(ws: Workspace, s: Series, version: str, commit: str) -> List[str]:
    images = s.images_for(version)
    blobs = gitlayer.tree_blobs(ws.repo, commit, list(images))
    problems = []
    for rel, options in images.items():
        if blobs.get(rel) in {img.pre for img in options}:
            continue
        if s.name in releases.MOVING_TARGETS:  # apply serves a later commit by trial
            problems.append(
                f"{rel} at {commit[:10]} is not the pre-image {s.name} recorded at "
                f"{', '.join(s.releases)} (apply serves it only where every hunk applies "
                f"strictly); update the series with mla-seam rebase --onto {s.name} --write"
            )
        else:
            problems.append(
                f"{rel} at {version} is not a pre-image {s.name} recorded (apply would refuse); "
                f"re-export the line with mla-seam rebase --write"
            )
    return problems


def _served_by_line(s: Series, version: str, sv: Survey) -> bool:
    """Whether apply serves a version its line does not list (``0.19.1`` at upstream's tag
    ``core_v0.19.0``, ``0.17.0rc0``, an unlisted patch release): same ``MAJOR.MINOR`` and every
    hook applies strictly (exact, offset or obsolete), as ``mla-seam apply`` then does."""
    strict = (PatchClass.EXACT, PatchClass.OFFSET, PatchClass.OBSOLETE)
    return s.line == releases.line_of(version) and all(p.cls in strict for p in sv.patches)


def _reasons(sv: Survey, served: bool, ws: Workspace, listed: bool = True) -> List[str]:
    reasons = []
    if not served:
        reasons.append(
            f"no series lists megatron-core {sv.onto_version}; {sv.series.name} surveyed: rebase "
            f"with `mla-seam rebase --megatron DIR --onto {sv.onto} --from {sv.series.line}`"
        )
    for p in sv.patches:
        if served and p.cls not in (PatchClass.EXACT, PatchClass.OFFSET):
            reasons.append(f"{p.hook} {p.name}: {p.cls.value}: {p.detail}")
        elif not served and p.cls in (PatchClass.CONFLICT, PatchClass.THREE_WAY):
            reasons.append(f"{p.hook} {p.name}: {p.cls.value}: {p.detail}")
    if served and listed:
        reasons += _preimage_problems(ws, sv.series, sv.onto_version, sv.onto_commit)
    reasons += contracts.adapter_problems(sv.new_contracts)
    return reasons


def tag_entry(
    ws: Workspace,
    lines: Sequence[Series],
    ref: str,
    previous: Optional[Dict[str, object]],
    baseline: Optional[Series] = None,
) -> Dict[str, object]:
    """The drift schema's ``tags[]`` entry of one ref (``baseline``: also survey that line)."""
    commit, source = ws.resolve(ref)
    version = ws.version_at(commit)
    s, listed = series_for_ref(lines, ref, version, ws.repo)
    sv = survey(ws, s, ref, range_diff=False)
    served = listed or _served_by_line(s, version, sv)
    changes = contract_changes(previous, sv.new_contracts)
    reasons = _reasons(sv, served, ws, listed)
    base = None
    if baseline is not None:
        bv = sv if baseline.name == s.name else survey(ws, baseline, ref, range_diff=False)
        base = {"series": baseline.name, "patches": [p.to_json() for p in bv.patches]}
    return {
        "tag": ref,
        "version": version,
        "line": s.line if s.name in releases.MOVING_TARGETS else releases.line_of(version),
        "commit": commit,
        "source": source,
        "series": s.name,
        "served": served,
        "history": sv.history,
        "patches": [p.to_json() for p in sv.patches],
        "contracts": sv.new_contracts,
        "contract_changes": changes,
        "verdict": SUPPORTED if not reasons else NEEDS_WORK,
        "reasons": reasons,
        "baseline": base,
        "gpu": None,
    }


def contract_changes(
    previous: Optional[Mapping[str, object]], values: Mapping[str, object]
) -> List[Dict[str, object]]:
    """The contract changes of a tag against the tag swept before it (``[]``: the first)."""
    if previous is None:
        return []
    return [
        dict(c.to_json(), since=previous["tag"])
        for c in contracts.diff(previous["contracts"], values)  # type: ignore[arg-type]
    ]


# --- the sweep ---------------------------------------------------------------------------------


def _progress(total: int):
    """A rich progress bar on an interactive stderr, else ``None`` (a log line per tag)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console  # pylint: disable=import-outside-toplevel
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("drift {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def sweep(
    ws: Workspace,
    refs: Sequence[str],
    lines: Sequence[Series],
    baseline: Optional[Series] = None,
    cache: Optional[Path] = None,
) -> List[Dict[str, object]]:
    """``tag_entry`` for every ref, in order, each compared with the one before.

    With ``cache`` (a folder, :mod:`mla_seam.drift.cache`), a ref whose entry is there is not
    surveyed again, and new entries are stored.
    """
    resolved = {ref: ws.resolve(ref) for ref in refs}
    keys: Dict[str, str] = {}
    found: Dict[str, Dict[str, object]] = {}
    if cache is not None:
        tags = gitlayer.tags_at(ws.user) if ws.user is not None else {}
        for ref in refs:
            commit, source = resolved[ref]
            keys[ref] = entry_cache.key(ref, commit, source, tags, lines, baseline)
            hit = entry_cache.load(cache, keys[ref])
            if hit is not None:
                found[ref] = hit
    # A partial clone fetches the files every survey reads in one batch, not one per tag.
    ws.ensure([resolved[ref][0] for ref in refs if ref not in found], ws.read_paths)
    entries: List[Dict[str, object]] = []
    bar = _progress(len(refs))
    task = bar.add_task("", total=len(refs)) if bar else None
    with bar or contextlib.nullcontext():
        for ref in refs:
            if bar:
                bar.update(task, description=ref)
            else:
                log.info(
                    "mla-seam drift: %s%s", ref, " (unchanged: cached)" if ref in found else ""
                )
            entry = found.get(ref)
            if entry is None:
                entry = tag_entry(ws, lines, ref, None, baseline)
                if cache is not None:
                    entry_cache.save(cache, keys[ref], entry)
            previous = entries[-1] if entries else None
            entries.append(dict(entry, contract_changes=contract_changes(previous, entry["contracts"])))  # type: ignore[arg-type]
            if bar:
                bar.advance(task)
    if cache is not None:
        entry_cache.prune(cache)
    return entries


def _line_summary(entries: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """Per release line: its tags, which hooks moved, became upstream/obsolete, contract drift."""
    lines: Dict[str, Dict[str, object]] = {}
    for entry in entries:
        line = str(entry["line"])
        row = lines.setdefault(
            line,
            {
                "series": entry["series"],
                "tags": [],
                "verdict": SUPPORTED,
                **{cls.value: [] for cls in PatchClass},
                "contracts_changed": [],
            },
        )
        row["tags"].append(entry["tag"])  # type: ignore[union-attr]
        if entry["verdict"] != SUPPORTED:
            row["verdict"] = NEEDS_WORK
        patches = (entry["baseline"] or entry)["patches"]  # type: ignore[index]
        if entry["baseline"]:
            ours = {p["hook"] for p in entry["patches"]}  # type: ignore[union-attr]
            theirs = {p["hook"] for p in patches}  # type: ignore[union-attr]
            row["line_only"] = sorted(set(row.get("line_only", [])) | (ours - theirs))
        for p in patches:  # type: ignore[union-attr]
            bucket = row[p["class"]]
            if p["hook"] not in bucket:
                bucket.append(p["hook"])
        for change in entry["contract_changes"]:  # type: ignore[union-attr]
            name = change["probe"] + (f"[{change['key']}]" if change["key"] else "")
            if name not in row["contracts_changed"]:
                row["contracts_changed"].append(name)
    return lines


def run_timestamp() -> str:
    """UTC time of this run, ISO 8601; ``SOURCE_DATE_EPOCH`` pins it (reproducible reports)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        if epoch and epoch.isdigit()
        else _dt.datetime.now(_dt.timezone.utc)
    )
    return when.isoformat(timespec="seconds")


def report(
    spec: str,
    entries: Sequence[Dict[str, object]],
    baseline: Optional[str] = None,
    *,
    include_pre: bool = False,
    skipped_prereleases: Sequence[str] = (),
) -> Dict[str, object]:
    """The whole ``drift.json`` document (GPU slots empty; see :mod:`mla_seam.drift.gpu`)."""
    doc: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "tool": f"mla-seam {__version__}",
        "run": {
            "timestamp": run_timestamp(),
            "python": platform.python_version(),
            "prereleases": include_pre,
            "skipped_prereleases": list(skipped_prereleases),
            "cards": [],
            "versions": [],
        },
        "range": spec,
        "baseline": baseline,
        "classes": [c.value for c in PatchClass],
        "probes": [
            {
                "name": p.name,
                "file": p.file,
                "description": p.description,
                "checked": p.expect is not None,
                "relied_on_by": p.why,
            }
            for p in contracts.PROBES
        ],
        "tags": list(entries),
        "since_previous": None,
    }
    return refresh(doc)


def refresh(doc: Dict[str, object]) -> Dict[str, object]:
    """Recompute ``lines`` and ``summary`` from ``tags`` (after GPU verdicts changed them)."""
    entries: List[Dict[str, object]] = doc["tags"]  # type: ignore[assignment]
    needs = [e["tag"] for e in entries if e["verdict"] != SUPPORTED]
    gpu = [e for e in entries if e.get("gpu")]
    doc["lines"] = _line_summary(entries)
    doc["summary"] = {
        "tags": len(entries),
        "supported": len(entries) - len(needs),
        "needs_work": len(needs),
        "needs_work_tags": needs,
        "gpu_verdicts": len(gpu),
        "gpu_by_verdict": _count(str(e["gpu"]["verdict"]) for e in gpu),  # type: ignore[index]
        "verdict": SUPPORTED if not needs else NEEDS_WORK,
    }
    return doc


def _count(values) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))
