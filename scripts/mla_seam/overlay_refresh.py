"""``mla-seam rebase --refresh-overlay [--check]``: record the overlay's blob in every manifest.

After an adapter edit every line's ``manifest.json`` must name the new overlay blob (``apply``
verifies it). This module changes only that entry, only where it differs, with the manifest's
own deterministic layout, so a second run changes nothing; ``--check`` reports stale lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from mla_seam import gitlayer, paths
from mla_seam.errors import SeriesCorruptError
from mla_seam.series import json_bytes, load_series
from mla_seam.tree import replace_atomic


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
