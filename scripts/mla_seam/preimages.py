"""The release files a series was made for (its pre-images), obtained on demand and verified.

A manifest names each release file its series was made for by git blob id only (``files``:
``pre``); mla-seam ships no upstream file. ``--3way`` takes its merge bases from these files, a
revert whose stored copy is gone rebuilds a release file from them, and a refusal names a fork's
changed lines against them. :func:`obtain` looks, first match per blob:

1. the repositories it is given: the user's own (no network) and the release checkouts in
   mla-seam's cache;
2. the megatron-core sdists of the releases the manifest lists for that image
   (:func:`mla_seam.upstream.fetch_sdist`: sha256-verified against the package index's hash,
   kept in ``<cache>/sdists``): the cached ones first, then, with ``download``, one fetched from
   the package index. A PyPI sdist holds ``megatron/core`` exactly as the release's tag does.

Every candidate is hashed to its git blob id and used only when that is the blob the manifest
records; anything else is skipped, never used. A moving target (``main``, ``dev``) has no sdist:
its pre-images come from the user's repository, and :func:`unavailable` names the commit to
fetch.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

import git
from mla_seam import gitlayer, paths, releases
from mla_seam.errors import PreimageUnavailableError, UpstreamError
from mla_seam.series import Series

log = logging.getLogger(__name__)


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


def _by_release(series: Series, wanted: Set[str]) -> Dict[str, Dict[str, str]]:
    """``release -> {blob: tree path}``: where each wanted pre-image lies in which release
    (releases of the manifest that have an sdist; a moving target's snapshot has none)."""
    result: Dict[str, Dict[str, str]] = {}
    for rel, images in series.files.items():
        for img in images:
            if img.pre not in wanted:
                continue
            for release in img.releases:
                if releases.parse_snapshot(release) is None:
                    result.setdefault(release, {})[img.pre] = rel
    return result


def _read_members(sdist: Path, wanted: Mapping[str, str]) -> Dict[str, bytes]:
    """The wanted ``blob -> tree path`` files of a verified sdist, each only if it is its blob."""
    found: Dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            names = {}
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.isfile() and len(parts) > 1:
                    names[PurePosixPath(*parts[1:]).as_posix()] = member
            for blob, rel in wanted.items():
                member = names.get(rel)
                handle = tar.extractfile(member) if member is not None else None
                if handle is None:
                    continue
                data = handle.read()
                if gitlayer.blob_id(data) == blob:
                    found[blob] = data
                else:
                    log.debug("mla-seam: %s's %s is not blob %s", sdist.name, rel, blob)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        log.warning("mla-seam: %s cannot be read (%s); skipped", sdist, exc)
    return found


def from_sdists(
    series: Series, wanted: Iterable[str], *, download: bool
) -> Tuple[Dict[str, bytes], List[str]]:
    """The wanted pre-images from the sdists of the releases that have them (cached sdists
    first; with ``download``, then from the package index), each verified against its blob id;
    and why a release's sdist could not be had (one line each)."""
    from mla_seam import upstream  # pylint: disable=import-outside-toplevel

    left = set(wanted)
    where = _by_release(series, left)
    found: Dict[str, bytes] = {}
    problems: List[str] = []
    cached = [r for r in where if upstream.cached_sdist(r) is not None]
    order = cached + ([r for r in where if r not in cached] if download else [])
    for release in order:
        todo = {blob: rel for blob, rel in where[release].items() if blob in left}
        if not todo:
            continue
        try:
            sdist = upstream.fetch_sdist(release)
        except UpstreamError as exc:
            problems.append(f"{release}: {exc.message.splitlines()[0].rstrip(':')}")
            continue
        got = _read_members(sdist, todo)
        found.update(got)
        left -= set(got)
        if not left:
            break
    return found, problems


def obtain(
    series: Series, wanted: Iterable[str], repos: Sequence[git.Repo], *, download: bool
) -> Tuple[Dict[str, bytes], List[str]]:
    """``blob id -> bytes`` of the wanted pre-images (see the module docstring for the order),
    every one verified; and the reasons an sdist could not be had."""
    wanted = set(wanted)
    found = from_repos(repos, wanted)
    problems: List[str] = []
    if wanted - set(found):
        more, problems = from_sdists(series, wanted - set(found), download=download)
        found.update(more)
    return found, problems


def unavailable(
    series: Series, missing: Mapping[str, str], what: str, problems: Sequence[str] = ()
) -> PreimageUnavailableError:
    """The error for pre-images (``tree path -> blob``) that no source had: which commit to
    fetch for a moving target, the sdist to get (or where to put it) for a release line."""
    name = series.name
    files = "; ".join(f"{rel} (blob {blob[:12]})" for rel, blob in sorted(missing.items()))
    upstream_record = series.upstream
    if name in releases.MOVING_TARGETS:
        commit = str(upstream_record.get("commit") or "")
        return PreimageUnavailableError(
            f"{what} needs {name}'s files at {commit[:10]}: {files}; the tree's repository "
            f"lacks them, and {name} has no sdist to take them from",
            f"fetch the commit the series was made from into the tree's repository (`git fetch "
            f"origin {commit}`) and run again",
        )
    wanted = set(missing.values())
    versions = sorted(_by_release(series, wanted), key=releases.version_key)
    why = f" ({'; '.join(problems)})" if problems else ""
    get = versions[-1] if versions else "X.Y.Z"
    return PreimageUnavailableError(
        f"{what} needs the release files {files}: the tree's repository lacks them and the "
        f"megatron-core sdist of {' or '.join(versions) or 'the release'} could not be had{why}",
        f"with network access run again (the sdist comes from the package index); offline, run "
        f"`mla-seam upstream get {get}` on a networked machine and copy its cache folder to "
        f"{paths.cache_dir()} (or point MLA_SEAM_CACHE at a copy); or fetch the release's tag "
        f"into the tree's repository (`git fetch origin tag {releases.TAG_PREFIX}{get}`)",
    )


def need(
    series: Series, wanted: Mapping[str, Sequence[str]], repos: Sequence[git.Repo], what: str
) -> Dict[str, bytes]:
    """For each tree path, at least one of its candidate pre-images (``rel -> blobs``), fetched
    as :func:`obtain` does (downloading an sdist when needed); ``blob -> bytes``, verified.

    Raises:
        PreimageUnavailableError: a path has none of its pre-images anywhere.
    """
    blobs = {b for candidates in wanted.values() for b in candidates}
    found = from_repos(repos, blobs)
    problems: List[str] = []
    for download in (False, True):  # a download only for a path no cached sdist serves
        lacking = [rel for rel, candidates in wanted.items() if not set(candidates) & set(found)]
        if not lacking:
            return found
        more, problems = from_sdists(
            series, {b for rel in lacking for b in wanted[rel]}, download=download
        )
        found.update(more)
    lacking = [rel for rel, candidates in wanted.items() if not set(candidates) & set(found)]
    if lacking:
        raise unavailable(series, {rel: wanted[rel][0] for rel in lacking}, what, problems)
    return found
