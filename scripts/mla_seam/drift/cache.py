"""Per-tag drift entries kept between runs: a tag nothing changed for is not surveyed again.

An entry is the drift report's ``tags[]`` entry of one ref (without its ``contract_changes``,
which depend on the tag before it and are recomputed). Its key holds everything the survey read:
the ref and the commit it resolved to, where that commit came from, the tags of the checkout
(culprits are read from them), every release line's series and the baseline's (their sha256),
and mla-seam's own code. A night with nothing new upstream finds every entry; main moving
surveys main alone. The nightly job keeps the folder in the mla-seam cache
(``<cache>/sweeps``); entries unused for :data:`KEEP_DAYS` are removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from mla_seam.series import Series

KEEP_DAYS = 30


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of mla-seam's Python sources: a code change is a new cache."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key(
    ref: str,
    commit: str,
    source: str,
    checkout_tags: Mapping[str, str],
    lines: Sequence[Series],
    baseline: Optional[Series],
) -> str:
    """The cache key of one ref's entry (see the module doc)."""
    parts = [
        ref,
        commit,
        source,
        sorted(checkout_tags.items()),
        sorted((s.name, s.sha256) for s in lines),
        (baseline.name, baseline.sha256) if baseline else None,
        code_digest(),
    ]
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def load(folder: Path, name: str) -> Optional[Dict[str, Any]]:
    """The entry stored under ``name`` (``None``: none, or unreadable)."""
    path = Path(folder) / f"{name}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or "tag" not in entry:
        return None
    os.utime(path)  # in use: kept by prune
    return entry


def save(folder: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Store ``entry`` under ``name`` (written aside and renamed: never half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in entry.items() if k != "contract_changes"}
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / f"{name}.json")


def prune(folder: Path, days: int = KEEP_DAYS) -> int:
    """Remove entries unused for ``days``; how many."""
    limit = time.time() - days * 86400
    removed = 0
    for path in Path(folder).glob("*.json"):
        if path.stat().st_mtime < limit:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
