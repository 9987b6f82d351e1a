"""What earlier mla-seam versions wrote into Megatron trees, so that newer ones recognise it.

(Not :mod:`mla_seam.releases`, which knows upstream's megatron-core releases.)
``data/earlier_versions.json`` holds, per released mla-seam version, the adapter's blob id and,
per release line, the pre- and post-image blob of every touched file and the manifest's sha256.
With it, ``--status`` reports a tree patched by an older mla-seam as "applied by mla-seam X"
(not as someone else's adapter or a tree edited after apply), ``--revert`` restores it and
``apply`` upgrades it to the current series in one transaction.

A new mla-seam release adds its entry before it is tagged::

    python -m mla_seam.earlier_versions 0.2.0 PATH_TO_BUNDLE   # prints the updated data file
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mla_seam.output import emit

DATA_FILE = "earlier_versions.json"
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class OldImage:
    """One touched file as an earlier mla-seam release patched it."""

    version: str  # the mla-seam version that wrote it
    line: str  # the series folder name, core_v0.19
    pre: str
    post: str


def _read() -> dict:
    text = importlib.resources.files("mla_seam").joinpath("data", DATA_FILE).read_text("utf-8")
    data = json.loads(text)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{DATA_FILE}: unknown schema {data.get('schema')!r}")
    return data


@functools.lru_cache(maxsize=None)
def releases() -> Dict[str, dict]:
    """``{mla-seam version: {"overlay": {...}, "lines": {...}}}`` from the data file."""
    return dict(_read()["releases"])


def old_overlays() -> Dict[str, Dict[str, str]]:
    """``{tree path: {adapter blob: mla-seam version}}`` of every released adapter."""
    result: Dict[str, Dict[str, str]] = {}
    for version, entry in releases().items():
        for rel, blob in entry.get("overlay", {}).items():
            result.setdefault(rel, {})[blob] = version
    return result


def old_images(line: str) -> Dict[str, List[OldImage]]:
    """``{touched file: [OldImage, ...]}`` that released mla-seam versions wrote on ``line``."""
    result: Dict[str, List[OldImage]] = {}
    for version, entry in releases().items():
        for rel, images in entry.get("lines", {}).get(line, {}).get("files", {}).items():
            for img in images:
                result.setdefault(rel, []).append(OldImage(version, line, img["pre"], img["post"]))
    return result


def old_lines() -> Dict[str, List[str]]:
    """``{line: [touched files]}`` over every released version (for fingerprinting)."""
    result: Dict[str, set] = {}
    for entry in releases().values():
        for line, data in entry.get("lines", {}).items():
            result.setdefault(line, set()).update(data.get("files", {}))
    return {line: sorted(files) for line, files in result.items()}


def snapshot(bundle: Path) -> dict:
    """The data-file entry of the bundle at ``bundle`` (its manifests and overlay blobs)."""
    lines: Dict[str, dict] = {}
    overlay: Dict[str, str] = {}
    for line_dir in sorted(p for p in (bundle / "patches").iterdir() if p.is_dir()):
        raw = (line_dir / "manifest.json").read_bytes()
        manifest = json.loads(raw)
        overlay.update(manifest["overlay"])
        lines[line_dir.name] = {
            "series_sha256": hashlib.sha256(raw).hexdigest(),
            "files": {
                rel: [{"pre": i["pre"], "post": i["post"], "releases": i["releases"]} for i in imgs]
                for rel, imgs in sorted(manifest["files"].items())
            },
        }
    return {"overlay": overlay, "lines": lines}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.earlier_versions VERSION BUNDLE``: the data file with VERSION added."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("usage: python -m mla_seam.earlier_versions VERSION BUNDLE_ROOT\n")
        return 2
    try:
        data = _read()
    except FileNotFoundError:
        data = {"schema": SCHEMA, "releases": {}}
    data["releases"][args[0]] = snapshot(Path(args[1]))
    emit(json.dumps(data, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
