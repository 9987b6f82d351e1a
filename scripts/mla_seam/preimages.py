"""The release files a line's series was made for, carried in the bundle: ``pre-images.tar.xz``.

Every line folder holds one archive with the bytes of every pre-image its manifest records (one
member per blob, named by its git blob id), registered in ``manifest.json``::

    "pre_images": {"file": "pre-images.tar.xz", "sha256": "<hex>", "blobs": ["<blob id>", ...]}

With it mla-seam never depends on what the user's repository holds: ``--3way`` takes its merge
base from here (a clone at another tag of the line, a shallow or blobless clone, a plain folder),
a refusal names the fork's changed lines against the release's, and a revert whose stored copy
is gone can still rebuild a release file. Every member is checked against its name (its blob id)
when read; the archive against the manifest's sha256 when the series is loaded.

The archive is byte-stable (sorted members, fixed mode/owner/mtime, fixed xz preset), so
``rebase --write`` re-exports the same bytes from the same release files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import lzma
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence

import git
from mla_seam import gitlayer

FILE_NAME = "pre-images.tar.xz"
MANIFEST_KEY = "pre_images"
_XZ_PRESET = 6  # 8 MiB dictionary: far more than one line's files; ~9 MiB to read back


def pack(blobs: Mapping[str, bytes]) -> bytes:
    """The archive bytes for ``blob id -> bytes`` (deterministic)."""
    buffer = io.BytesIO()
    with lzma.open(buffer, "wb", format=lzma.FORMAT_XZ, preset=_XZ_PRESET) as xz:
        with tarfile.open(fileobj=xz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for blob in sorted(blobs):
                info = tarfile.TarInfo(blob)
                info.size, info.mode, info.mtime = len(blobs[blob]), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(blobs[blob]))
    return buffer.getvalue()


def write(out_dir: Path, blobs: Mapping[str, bytes]) -> dict:
    """Write the archive of ``blobs`` into ``out_dir``; return its manifest entry."""
    data = pack(blobs)
    (out_dir / FILE_NAME).write_bytes(data)
    return {"file": FILE_NAME, "sha256": hashlib.sha256(data).hexdigest(), "blobs": sorted(blobs)}


class PreimageError(ValueError):
    """The archive is not what its manifest entry says (caller maps it to its own error)."""


def check_entry(line_dir: Path, entry: object, wanted: Iterable[str]) -> Path:
    """The archive path of a manifest entry, checked (name, sha256, blob list covering
    ``wanted``); raises PreimageError."""
    if not (
        isinstance(entry, dict)
        and entry.get("file") == FILE_NAME
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("blobs"), list)
        and all(isinstance(b, str) for b in entry["blobs"])
    ):
        raise PreimageError(f"manifest '{MANIFEST_KEY}' is malformed: {entry!r}"[:200])
    missing = sorted(set(wanted) - set(entry["blobs"]))
    if missing:
        raise PreimageError(f"{FILE_NAME} lacks the pre-images {', '.join(missing)}")
    path = line_dir / FILE_NAME
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise PreimageError(f"{FILE_NAME} cannot be read ({exc.strerror})") from None
    if digest != entry["sha256"]:
        raise PreimageError(f"{FILE_NAME} has sha256 {digest}, the manifest says {entry['sha256']}")
    return path


@functools.lru_cache(maxsize=16)
def _unpack(path: str, sha256: str) -> Dict[str, bytes]:
    del sha256  # part of the cache key: a re-exported archive is read again
    result: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:xz") as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member) if member.isfile() else None
                if handle is not None:
                    result[member.name] = handle.read()
    except (OSError, tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        raise PreimageError(f"{Path(path).name} cannot be unpacked ({exc})") from None
    return result


def read(path: Path, sha256: str, wanted: Sequence[str]) -> Dict[str, bytes]:
    """``blob id -> bytes`` for the ``wanted`` blobs the archive holds, each verified against
    its id; raises PreimageError for a member that is not the blob it is named after."""
    members = _unpack(str(path), sha256)
    found = {}
    for blob in wanted:
        data = members.get(blob)
        if data is None:
            continue
        if gitlayer.blob_id(data) != blob:
            raise PreimageError(f"{path.name}: member {blob} does not hash to its name")
        found[blob] = data
    return found


def from_repos(repos: Sequence[git.Repo], wanted: Iterable[str]) -> Dict[str, bytes]:
    """``blob id -> bytes`` of the wanted blobs found in any of ``repos``, each verified."""
    found: Dict[str, bytes] = {}
    for blob in wanted:
        for repo in repos:
            data = gitlayer.blob_bytes(repo, blob)
            if data is not None and gitlayer.blob_id(data) == blob:
                found[blob] = data
                break
    return found


def bundled(series: object, wanted: Iterable[str]) -> Dict[str, bytes]:
    """The wanted pre-images from ``series``' archive (``{}`` when the line carries none)."""
    path: Optional[Path] = getattr(series, "pre_images", None)
    sha256: str = getattr(series, "pre_images_sha256", "")
    if path is None:
        return {}
    return read(path, sha256, sorted(set(wanted)))
