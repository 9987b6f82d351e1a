"""Drift across nights: a history file (one JSON line per run) and what changed since the last.

``--history FILE`` reads the runs recorded so far, puts into the report what changed since the
last one (``since_previous``: new and removed tags, verdicts, GPU verdicts, patch classes and
commits that changed) and the trend of the last runs, then appends this run. Keep the file
between nights (the nightly job keeps it on its state branch, `mla-seam/nightly-state`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

log = logging.getLogger(__name__)

#: Version of a history line; lines of another version are skipped with a warning.
LINE_VERSION = 1
TREND_RUNS = 30


def entry_of(doc: Mapping[str, Any]) -> Dict[str, Any]:
    """The history line of one report: per tag what ``since_previous`` compares."""
    tags = {}
    for e in doc["tags"]:
        gpu = e.get("gpu") or {}
        tags[e["tag"]] = {
            "version": e["version"],
            "commit": e["commit"],
            "series": e["series"],
            "verdict": e["verdict"],
            "gpu": gpu.get("verdict"),
            "classes": {p["hook"]: p["class"] for p in e["patches"]},
        }
    summary = doc["summary"]
    return {
        "history_version": LINE_VERSION,
        "timestamp": doc["run"]["timestamp"],
        "tool": doc["tool"],
        "range": doc["range"],
        "cards": doc["run"].get("cards") or [],
        "summary": {
            "tags": summary["tags"],
            "supported": summary["supported"],
            "needs_work": summary["needs_work"],
            "gpu_verdicts": summary.get("gpu_verdicts", 0),
            "gpu_by_verdict": summary.get("gpu_by_verdict", {}),
        },
        "tags": tags,
    }


def problem(entry: object) -> Optional[str]:
    """Why ``entry`` (one parsed history line) is not a usable record, or ``None``."""
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not a history record (an object)"
    if entry.get("history_version") != LINE_VERSION:
        return f"history_version {entry.get('history_version')!r}, not {LINE_VERSION}"
    if not isinstance(entry.get("timestamp"), str):
        return "no timestamp"
    tags = entry.get("tags")
    if not isinstance(tags, dict) or not all(isinstance(v, dict) for v in tags.values()):
        return "no tags object (tag -> record)"
    if not all(isinstance(v.get("classes", {}), dict) for v in tags.values()):
        return "a tag record whose classes are not an object (hook -> class)"
    if not isinstance(entry.get("summary"), dict):
        return "no summary object"
    return None


def load(path: Path) -> List[Dict[str, Any]]:
    """Every usable history line of ``path`` (missing file: none), oldest first.

    Each line is checked (:func:`problem`); a line that is not JSON or not a history record is
    skipped with a warning naming the file, the line and what is wrong with it.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            log.warning("mla-seam drift: %s line %d is not JSON (%s); skipped", path, number, exc)
            continue
        why = problem(entry)
        if why:
            log.warning("mla-seam drift: %s line %d is %s; skipped", path, number, why)
            continue
        entries.append(entry)
    return entries


def since(doc: Mapping[str, Any], previous: Optional[Mapping[str, Any]]) -> Optional[Dict]:
    """What changed between the last recorded run and this report (``None``: no earlier run)."""
    if previous is None:
        return None
    now = entry_of(doc)["tags"]
    before = previous.get("tags") or {}
    changed = []
    for tag, cur in now.items():
        old = before.get(tag)
        if old is None:
            continue
        what = []
        for key, label in (("verdict", "verdict"), ("gpu", "GPU verdict"), ("series", "series")):
            if old.get(key) != cur.get(key):
                what.append(f"{label} {old.get(key)} -> {cur.get(key)}")
        if old.get("commit") != cur.get("commit"):
            what.append(f"commit {str(old.get('commit'))[:12]} -> {str(cur.get('commit'))[:12]}")
        for hook in sorted(set(old.get("classes") or {}) | set(cur["classes"])):
            a, b = (old.get("classes") or {}).get(hook), cur["classes"].get(hook)
            if a != b:
                what.append(f"{hook} {a or '-'} -> {b or '-'}")
        if what:
            changed.append({"tag": tag, "changes": what})
    return {
        "previous_timestamp": previous.get("timestamp"),
        "new_tags": [t for t in now if t not in before],
        "removed_tags": [t for t in before if t not in now],
        "changed": changed,
    }


def trend(entries: List[Mapping[str, Any]], doc: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The last :data:`TREND_RUNS` runs and this one: timestamp and summary counts."""
    now = doc["run"]["timestamp"]
    entries = [e for e in entries if e["timestamp"] != now]
    rows = [dict(e["summary"], timestamp=e["timestamp"]) for e in entries[-(TREND_RUNS - 1) :]]
    current = entry_of(doc)
    rows.append(dict(current["summary"], timestamp=current["timestamp"]))
    return rows


def append(path: Path, doc: Mapping[str, Any]) -> None:
    """Add this run's line to the history file (created with its folder if missing).

    A line of the same run (same timestamp: the nightly job's GPU phase adding its verdicts to
    the CPU phase's report) is replaced, so a night is one line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry_of(doc), sort_keys=True) + "\n"
    try:
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        kept = []
    if kept:
        try:
            last = json.loads(kept[-1])
        except json.JSONDecodeError:
            last = None
        if problem(last) is None and last["timestamp"] == doc["run"]["timestamp"]:
            kept = kept[:-1]
        elif not kept[-1].endswith("\n"):
            kept[-1] += "\n"  # a truncated last line stays apart from the new one
    path.write_text("".join(kept) + line, encoding="utf-8")
