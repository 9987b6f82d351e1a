"""New megatron-core releases from the package index: ``mla-seam upstream list --refresh``.

mla-seam ships the sha256 of every sdist it was tested with (``upstream.SDIST_SHA256``). A
release published later is learned from the package index (PEP 691 JSON simple API:
``$MLA_SEAM_INDEX_URL``, else ``$PIP_INDEX_URL``, else PyPI), recorded with the sha256 the index
publishes in ``<cache>/index.json``, downloaded from the index's URL on first use, verified
against that hash, and the verified hash is kept in ``<cache>/sdists/sha256.json``; every later
use is checked against it. Versions older than the oldest built-in release are left out (no
series serves them); pre-releases and yanked files are listed but not offered unless asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from mla_seam.errors import UpstreamError
from mla_seam.paths import cache_dir
from mla_seam.releases import is_prerelease, version_key

log = logging.getLogger(__name__)

PACKAGE = "megatron-core"
INDEX_ENV = "MLA_SEAM_INDEX_URL"
DEFAULT_INDEX = "https://pypi.org/simple"
INDEX_FILE = "index.json"
RECORDED_FILE = "sha256.json"
TIMEOUT_S = 60
_SDIST_RE = re.compile(r"^megatron[-_]core-(.+)\.tar\.gz$")


def index_url() -> str:
    """The simple-API root asked for releases."""
    return (os.environ.get(INDEX_ENV) or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip(
        "/"
    )


def _cache(cache: Optional[Path]) -> Path:
    return Path(cache) if cache is not None else cache_dir()


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fetch(url: Optional[str] = None) -> Dict[str, dict]:
    """``{version: {"filename", "url", "sha256", "requires_python", "yanked"}}`` of every
    megatron-core sdist the index lists.

    Raises:
        UpstreamError: the index cannot be reached or answers with something unreadable.
    """
    root = (url or index_url()).rstrip("/")
    page = f"{root}/{PACKAGE}/"
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UpstreamError(
            f"cannot read the package index at {page}: {reason}",
            f"check network access, or point {INDEX_ENV} (or PIP_INDEX_URL) at a reachable "
            "index that serves the JSON simple API (PEP 691)",
        ) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise UpstreamError(
            f"{page} did not answer with a PEP 691 JSON project page", f"check {INDEX_ENV}"
        )
    releases: Dict[str, dict] = {}
    for item in files:
        match = _SDIST_RE.match(str(item.get("filename", ""))) if isinstance(item, dict) else None
        sha256 = (item.get("hashes") or {}).get("sha256") if match else None
        if not match or not sha256:
            continue
        releases[match.group(1)] = {
            "filename": item["filename"],
            "url": urllib.parse.urljoin(page, item.get("url", "")),
            "sha256": sha256,
            "requires_python": item.get("requires-python"),
            "yanked": bool(item.get("yanked")),
        }
    return releases


def refresh(oldest: str, cache: Optional[Path] = None) -> Dict[str, dict]:
    """Ask the index, keep releases from ``oldest`` on in ``<cache>/index.json``; return them."""
    found = {
        v: e for v, e in fetch().items() if version_key(v) >= version_key(oldest) and v[0].isdigit()
    }
    record = {
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "index": index_url(),
        "releases": found,
    }
    _write_json(_cache(cache) / INDEX_FILE, record)
    return found


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _entry_ok(version: object, entry: object) -> bool:
    """One recorded release: a dict naming its sdist file, URL and sha256 (what the index said)."""
    return (
        isinstance(version, str)
        and isinstance(entry, dict)
        and isinstance(entry.get("filename"), str)
        and bool(_SDIST_RE.match(entry["filename"]))
        and isinstance(entry.get("url"), str)
        and isinstance(entry.get("sha256"), str)
        and bool(_HEX64.match(entry["sha256"]))
    )


def indexed(cache: Optional[Path] = None) -> Dict[str, dict]:
    """The releases the last refresh recorded (empty before the first refresh).

    Read back through one check (:func:`_entry_ok`): a damaged entry is left out with a warning
    saying how to rebuild the file, never handed on.
    """
    path = _cache(cache) / INDEX_FILE
    releases = _read_json(path).get("releases")
    if releases is None:
        return {}
    good = (
        {v: dict(e) for v, e in releases.items() if _entry_ok(v, e)}
        if isinstance(releases, dict)
        else {}
    )
    if not isinstance(releases, dict) or len(good) != len(releases):
        log.warning(
            "mla-seam: %s has damaged entries (left out); `mla-seam upstream list --refresh` "
            "rebuilds it",
            path,
        )
    return good


def recorded_sha256(version: str, cache: Optional[Path] = None) -> Optional[str]:
    """The sha256 verified when the sdist of ``version`` was first downloaded, if any (a value
    that is not a sha256 counts as none)."""
    value = _read_json(_cache(cache) / "sdists" / RECORDED_FILE).get(version)
    return value if isinstance(value, str) and _HEX64.match(value) else None


def expected_sha256(version: str, cache: Optional[Path] = None) -> Optional[str]:
    """What an indexed release's sdist must hash to: the recorded hash, else the index's."""
    return recorded_sha256(version, cache) or (indexed(cache).get(version) or {}).get("sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(version: str, folder: Path, cache: Optional[Path] = None) -> Path:
    """Download an indexed release's sdist into ``folder``, verified; record its hash.

    Raises:
        UpstreamError: not indexed, unreachable, or the bytes do not match the index's hash.
    """
    entry = indexed(cache).get(version)
    if entry is None:
        raise UpstreamError(
            f"megatron-core {version} is not in the recorded index",
            "run `mla-seam upstream list --refresh` first",
        )
    want = expected_sha256(version, cache)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=folder))
    try:
        target = tmp / entry["filename"]
        try:
            with urllib.request.urlopen(entry["url"], timeout=TIMEOUT_S) as response:
                with open(target, "wb") as out:
                    shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as exc:
            raise UpstreamError(
                f"cannot download {entry['url']}: {getattr(exc, 'reason', None) or exc}",
                f"check network access to the index, or copy {entry['filename']} into {folder}",
            ) from None
        got = _sha256(target)
        if got != want:
            raise UpstreamError(
                f"{entry['filename']} from {entry['url']} has sha256 {got}, the index says {want}",
                "the download was damaged or replaced; run again, and report it if it persists",
            )
        final = folder / entry["filename"]
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record(version, got, cache)
    log.info("downloaded and verified %s (sha256 %s), hash recorded", final.name, got[:12])
    return final


def record(version: str, sha256: str, cache: Optional[Path] = None) -> None:
    """Keep the verified sha256 of an sdist for every later use."""
    path = _cache(cache) / "sdists" / RECORDED_FILE
    data = _read_json(path)
    data[version] = sha256
    _write_json(path, data)


def offered(releases: Dict[str, dict], builtin: List[str], include_prereleases: bool) -> List[str]:
    """Indexed versions that are new (not built in), not yanked, pre-releases only if asked."""
    return sorted(
        (
            v
            for v, e in releases.items()
            if v not in builtin
            and not e.get("yanked")
            and (include_prereleases or not is_prerelease(v))
        ),
        key=version_key,
    )
