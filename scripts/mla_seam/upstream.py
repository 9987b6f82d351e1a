"""Upstream Megatron-LM release checkouts: ``mla-seam upstream get|list``.

A release is named by its git tag (``core_v0.16.1``), its megatron-core version (``0.16.1``) or its
release line (``0.16``: the newest patch release of that line). :func:`get` returns a git checkout
of the release: the work tree at the release, the tag present, HEAD on branch ``main``.

Checkouts come from one of two sources:

* a git URL (argument ``url`` or ``$MLA_SEAM_UPSTREAM_URL``), shallow-cloned at the tag, when one
  is given and reachable;
* otherwise the matching PyPI megatron-core sdist, downloaded with pip and committed as a single
  root commit with a fixed identity and date, so the same release has the same commit id on every
  machine. The tree is the sdist minus its packaging metadata (``PKG-INFO``, ``*.egg-info/``); its
  ``megatron/core`` is the tag's ``megatron/core``.

Cache layout (``cache_dir()``, i.e. ``$MLA_SEAM_CACHE`` or ``~/.cache/mla-seam``)::

    sdists/megatron_core-0.16.1.tar.gz      verified against SDIST_SHA256 on every use
    checkouts/core_v0.16.1/                 read-only for callers; .git/mla-seam-source.json
    locks/<name>.lock                       fcntl locks: one builder per entry at a time

Entries are built in a ``.tmp-*`` folder next to their final place and renamed into it, so an
entry that exists is complete; a half-built one is never used and is swept by the next builder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Sequence

import git
from mla_seam import gitlayer, index, output
from mla_seam.errors import UpstreamError, UsageError
from mla_seam.paths import cache_dir
from mla_seam.releases import TAG_PREFIX  # callers read it from here too
from mla_seam.releases import (  # pylint: disable=unused-import
    is_prerelease,
    line_of,
    tag_of,
    version_key,
    version_of_tag,
)
from packaging.version import Version

log = logging.getLogger(__name__)

PACKAGE = "megatron-core"
URL_ENV = "MLA_SEAM_UPSTREAM_URL"
BRANCH = "main"
SOURCE_MARKER = "mla-seam-source.json"  # inside the checkout's .git folder

# Every megatron-core release on PyPI from 0.13.0 to 0.19.2 (there is no 0.18.1 or 0.19.1 there),
# with the sha256 of its sdist as PyPI serves it. PyPI never lets a file be replaced, so the hash
# pins the exact bytes a checkout's commit is built from.
SDIST_SHA256: Dict[str, str] = {
    "0.13.0": "73eda020cb9370d0b368595671def779f7ec3ce63140b2e5fb1e75ab86c3a505",
    "0.13.1": "45f63f5c66e4d83e05bad44557b8bb25de6615739a994176acd800055055c94c",
    "0.14.0": "fcfd4bb2bc3eb83a646aacab4d47ab8786a6dcb7bd9fe3ae9cbba8eb185158ec",
    "0.15.0": "58f0d98a4ea2041190a40520aaac1564048ed396bc97a285e54da55830b8ac03",
    "0.15.1": "213672c977742eea19f12dc7289ecd101f49a7ee5a76f5020f2efec723dd4429",
    "0.15.2": "8397898a0ade70c3ba96fc21335a7e022587bc139b91bf625ef76cd0e66d7b4f",
    "0.15.3": "907db0915494d9d6bf8c5a420d8752812cb0aedd37973eb77d12edb8e2b844da",
    "0.16.0": "597961fc6ea21f9becddd24e4d1d44dd683d1957f339003af9dff950e6f8c2dc",
    "0.16.1": "86522feacfa5ef384a6ac627e7d88cf4866811aed3bc9b6c2a85cbf15cff91a3",
    "0.17.0": "ff66c206ed164bc602ff00310388605fac41f284262176e17246a9e94163b205",
    "0.17.1": "d4c86f3bd702f5cc9a72bcb880b1e5aa7d58f67553474940571545918742a4c8",
    "0.18.0": "8feff0cd371e5ef26dc36636a23e197983ddddf10b43847871697b89be8cd6ea",
    "0.18.2": "911216b7ce161ffc196baecc4ef7ec39f4a33cf79b50f5e0c123235e42002cdc",
    "0.19.0": "9c967f86ba8e52c6cc96341d5f0a96d639cc4a5563275c46228a8de8ccd3ab9f",
    "0.19.2": "de643eee32007a7504ad52f061103fe7432503603b6321c16c861eb67dbd3353",
}

#: Known releases, oldest first.
RELEASES: List[str] = sorted(SDIST_SHA256, key=Version)

# From 0.17 on the sdist metadata asks for Python >= 3.12; pip must be told the target interpreter
# (the source still imports on 3.11, and we only unpack it).
_PY312_FROM = Version("0.17.0")

_REF_RE = re.compile(r"^(?:core_v|v)?(\d+)\.(\d+)(?:\.(\d+))?$")

# The commit message of a materialized release. Part of the commit id: changing a byte of it
# changes every release's id, so treat it as a format version.
_MESSAGE = """\
megatron-core {version} from PyPI sdist {sdist}

Release {tag} of Megatron-LM's megatron-core, materialized by mla-seam
from the PyPI source distribution:

  file:   {sdist}
  sha256: {sha256}

The tree is the sdist's contents without PKG-INFO and *.egg-info/
(packaging metadata that the git tag does not have). Author, committer
and date are fixed (the date is the newest mtime in the archive), so the
same sdist gives this commit id on any machine.
"""


# --- version <-> tag map -------------------------------------------------------------------------


def lines() -> List[str]:
    """Known release lines (``"0.16"``), oldest first."""
    return list(dict.fromkeys(line_of(v) for v in RELEASES))


def newest_in_line(line: str) -> str:
    """The newest known release of ``line`` (``"0.16"`` -> ``"0.16.1"``).

    Raises:
        UpstreamError: no known release belongs to ``line``.
    """
    members = [v for v in RELEASES if line_of(v) == line]
    if not members:
        raise _unknown(line)
    return members[-1]


def version_for(ref: str) -> str:
    """The megatron-core version a tag, version or line names.

    Args:
        ref: ``core_v0.16.1``, ``0.16.1`` (``v0.16.1`` too) or a line ``0.16`` / ``core_v0.16``.

    Returns:
        The exact known version, e.g. ``"0.16.1"``.

    Raises:
        UpstreamError: ``ref`` names no known release; the message lists the known lines.
    """
    bare = version_of_tag(ref)
    match = _REF_RE.match(ref.strip())
    if match is None:
        if bare and bare in index.indexed():
            return bare  # a release learned from the package index (0.17.0rc0, 0.21.0)
        raise _unknown(ref)
    major, minor, patch = match.groups()
    line = f"{int(major)}.{int(minor)}"
    if patch is None:
        return newest_in_line(line)
    version = f"{line}.{int(patch)}"
    if version not in SDIST_SHA256:
        if version in index.indexed():
            return version
        raise _unknown(ref)
    return version


def tag_for(version: str) -> str:
    """The upstream git tag of a release: ``"0.16.1"`` -> ``"core_v0.16.1"`` (any ref accepted)."""
    return tag_of(version_for(version))


def _unknown(ref: str) -> UpstreamError:
    known = "; ".join(
        f"{line} ({', '.join(v for v in RELEASES if line_of(v) == line)})" for line in lines()
    )
    return UpstreamError(
        f"unknown megatron-core release {ref!r}; known lines: {known}",
        "name a release as a tag (core_v0.16.1), a version (0.16.1) or a line (0.16: its newest)",
    )


# --- cache layout --------------------------------------------------------------------------------


def _cache(cache: Optional[Path]) -> Path:
    return Path(cache) if cache is not None else cache_dir()


def sdists_dir(cache: Optional[Path] = None) -> Path:
    """Folder of downloaded sdists (``<cache>/sdists``)."""
    return _cache(cache) / "sdists"


def checkouts_dir(cache: Optional[Path] = None) -> Path:
    """Folder of materialized checkouts (``<cache>/checkouts``)."""
    return _cache(cache) / "checkouts"


def checkout_path(ref: str, cache: Optional[Path] = None) -> Path:
    """Where the cached checkout of ``ref`` lives (whether or not it exists yet)."""
    return checkouts_dir(cache) / tag_for(ref)


def cached_source(ref: str, cache: Optional[Path] = None) -> Optional[Dict[str, str]]:
    """How the cached checkout of ``ref`` was made (``{"source": "sdist"|"git", ...}``).

    Returns ``None`` when the release is not cached.
    """
    marker = checkout_path(ref, cache) / ".git" / SOURCE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """Hold the exclusive cache lock ``name`` (an fcntl lock: released if the process dies)."""
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another mla-seam process to finish %s in %s", name, cache)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sweep(folder: Path, prefix: str) -> None:
    """Remove half-built ``.tmp-<prefix>-*`` entries left by a builder that died (lock held)."""
    for stale in folder.glob(f".tmp-{prefix}-*"):
        log.debug("removing half-built %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


# --- sdists --------------------------------------------------------------------------------------


def _find_sdist(folder: Path, version: str) -> Optional[Path]:
    for name in (f"megatron_core-{version}.tar.gz", f"megatron-core-{version}.tar.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _verify_sdist(path: Path, version: str, cache: Optional[Path] = None) -> None:
    expected = SDIST_SHA256.get(version) or index.expected_sha256(version, cache)
    actual = index.sha256_file(path)
    if actual != expected:
        raise UpstreamError(
            f"{path} has sha256 {actual}, not the package index's {expected}",
            f"delete {path} and run again to download it afresh",
        )


def _pip_download(version: str, dest: Path) -> None:
    """``pip download`` the sdist of ``version`` into ``dest`` with this interpreter's pip."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        f"--dest={dest}",
    ]
    if Version(version) >= _PY312_FROM:
        cmd.append("--python-version=3.12")
    cmd.append(f"{PACKAGE}=={version}")
    log.info("downloading %s==%s sdist from the package registry", PACKAGE, version)
    log.debug("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise UpstreamError(
            f"could not download the {PACKAGE}=={version} sdist: the package registry is "
            f"unreachable or refused it (pip exit {done.returncode}):\n{tail}",
            f"check network access to the registry (pip config, PIP_INDEX_URL), or pre-seed the "
            f"cache: copy megatron_core-{version}.tar.gz into {dest.parent} "
            f"(set MLA_SEAM_CACHE to use a cache folder you prepared elsewhere)",
        )


def fetch_sdist(ref: str, *, cache: Optional[Path] = None) -> Path:
    """The verified sdist of a release, downloaded into ``<cache>/sdists`` unless already there.

    Raises:
        UpstreamError: unknown release, registry unreachable, or a cached file with wrong bytes.
    """
    version = version_for(ref)
    folder = sdists_dir(cache)
    found = _find_sdist(folder, version)
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(_cache(cache), f"sdist-{version}"):
            found = _find_sdist(folder, version)
            if found is None and version not in SDIST_SHA256:
                found = index.download(version, folder, cache)
            elif found is None:
                found = _download_into(folder, version)
    _verify_sdist(found, version, cache)
    return found


def cached_sdist(ref: str, *, cache: Optional[Path] = None) -> Optional[Path]:
    """The verified sdist of a release when the cache holds it (nothing is downloaded); ``None``
    for a release the cache lacks or mla-seam does not know.

    Raises:
        UpstreamError: the cached file does not have the package index's sha256.
    """
    try:
        version = version_for(ref)
    except UpstreamError:
        return None
    if _find_sdist(sdists_dir(cache), version) is None:
        return None
    return fetch_sdist(version, cache=cache)


def _download_into(folder: Path, version: str) -> Path:
    _sweep(folder, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=folder))
    try:
        _pip_download(version, tmp)
        got = _find_sdist(tmp, version)
        if got is None:
            raise UpstreamError(
                f"pip reported success but left no {PACKAGE} {version} sdist in {tmp}",
                "run the pip download command by hand (mla-seam -v shows it) and check its output",
            )
        _verify_sdist(got, version)
        final = folder / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- materializing a checkout from an sdist ------------------------------------------------------


def _member_relpath(name: str, top: str) -> Optional[PurePosixPath]:
    """Path of a tar member below the sdist's top folder; ``None`` for what the tree leaves out."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] != top or ".." in parts or name.startswith("/"):
        raise UpstreamError(f"sdist member {name!r} lies outside {top}/", "the sdist is corrupt")
    rest = parts[1:]
    if not rest or rest == ("PKG-INFO",) or any(p.endswith(".egg-info") for p in rest):
        return None
    if ".git" in rest:
        raise UpstreamError(f"sdist member {name!r} would write into .git", "the sdist is corrupt")
    return PurePosixPath(*rest)


def _extract(sdist: Path, dest: Path) -> int:
    """Unpack ``sdist`` below ``dest`` (files 0644 or 0755); return the newest member mtime."""
    newest = 0
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        top = PurePosixPath(members[0].name).parts[0] if members else ""
        for member in members:
            newest = max(newest, int(member.mtime))
            rel = _member_relpath(member.name, top)
            if rel is None:
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                _write_member(tar, member, target)
            else:
                raise UpstreamError(
                    f"sdist member {member.name!r} is a link or device", "the sdist is corrupt"
                )
    return newest


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has data
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    # Git tracks only the executable bit; 0666/0777 members become 0644/0755.
    target.chmod(0o755 if member.mode & 0o111 else 0o644)


def _build_from_sdist(version: str, sdist: Path, dest: Path) -> Dict[str, str]:
    """Commit the sdist's tree as the single root commit of a new repository at ``dest``."""
    repo = gitlayer.init_repo(dest)
    gitlayer.pin_local_config(repo)  # the user's commit.gpgSign etc. must not reach the commit
    newest = _extract(sdist, dest)
    sha256 = index.sha256_file(sdist)
    date = datetime.fromtimestamp(newest, timezone.utc).isoformat()
    tag = tag_for(version)
    message = _MESSAGE.format(version=version, tag=tag, sdist=sdist.name, sha256=sha256)
    commit = gitlayer.commit_all(repo, message, date)
    gitlayer.create_tag(repo, tag, commit)
    return {"source": "sdist", "tag": tag, "sdist": sdist.name, "sha256": sha256, "commit": commit}


def _build_from_git(url: str, version: str, dest: Path) -> Dict[str, str]:
    """Shallow-clone ``url`` at the release's tag into ``dest``."""
    tag = tag_for(version)
    log.info("cloning %s at %s", url, tag)
    repo = gitlayer.clone_tag(url, tag, dest)
    if not (dest / "megatron" / "core").is_dir():
        raise UpstreamError(f"{url} at {tag} has no megatron/core", "give a Megatron-LM URL")
    gitlayer.checkout_branch(repo, BRANCH, f"refs/tags/{tag}")
    commit = gitlayer.tag_commit(repo, tag) or ""
    return {"source": "git", "tag": tag, "url": url, "commit": commit}


def _build(
    version: str, url: Optional[str], cache: Path, dest: Path, strict: bool = False
) -> Dict[str, str]:
    """Fill the empty folder ``dest`` from ``url`` if that works, else from the sdist.

    Raises:
        UpstreamError: ``strict`` (a URL the user named) and the clone failed: never the sdist.
    """
    if url:
        try:
            return _build_from_git(url, version, dest)
        except (git.GitCommandError, UpstreamError) as err:
            if strict:
                raise UpstreamError(
                    f"--url {url}: could not clone {tag_for(version)} from it ({_reason(err)}); "
                    "nothing was fetched from the package registry",
                    "check the URL (a Megatron-LM git repository carrying the tag), or drop --url "
                    "to build the release from its PyPI sdist",
                ) from None
            log.warning(
                "could not clone %s at %s (%s); building it from the PyPI sdist instead",
                url,
                tag_for(version),
                _reason(err),
            )
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
    sdist = fetch_sdist(version, cache=cache)
    log.info("materializing %s from %s", tag_for(version), sdist.name)
    return _build_from_sdist(version, sdist, dest)


def _reason(err: Exception) -> str:
    """One line saying why a git command failed (git's ``fatal:`` line when there is one)."""
    text = str(getattr(err, "stderr", "") or err).strip().strip("'").strip()
    candidates = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in candidates if line.startswith(("fatal:", "stderr: 'fatal:"))]
    chosen = (fatal or candidates or [type(err).__name__])[0]
    return chosen.removeprefix("stderr: '").strip("'")


def _materialize(version: str, url: Optional[str], cache: Path, strict: bool = False) -> Path:
    """The cached checkout of ``version``, built (atomically, under a lock) if missing."""
    final = checkout_path(version, cache)
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache, tag_for(version)):
            if not final.exists():
                _sweep(final.parent, final.name)
                _build_atomically(version, url, cache, final, strict)
    elif strict and url:
        source = cached_source(version, cache) or {}
        if source.get("url") != url:
            log.warning(
                "%s is already cached (from %s); --url %s was not used: delete %s to clone it "
                "from that URL",
                tag_for(version),
                source.get("url") or "the PyPI sdist",
                url,
                final,
            )
    if not (final / ".git").is_dir():
        raise UpstreamError(
            f"cached checkout {final} is not a git repository", f"delete {final} and run again"
        )
    return final


def _build_atomically(
    version: str, url: Optional[str], cache: Path, final: Path, strict: bool = False
) -> None:
    # Built next to its final place (same file system) and renamed: an entry that exists is whole.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        source = _build(version, url, cache, tmp, strict)
        marker = tmp / ".git" / SOURCE_MARKER
        marker.write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached %s at %s", final.name, final)


# --- public entry points -------------------------------------------------------------------------


def get(
    ref: str,
    into: Optional[Path] = None,
    url: Optional[str] = None,
    *,
    cache: Optional[Path] = None,
    strict: bool = False,
) -> Path:
    """A git checkout of the release ``ref`` (tag ``core_vX.Y.Z`` present, HEAD at it).

    Args:
        ref: tag, version or release line (see :func:`version_for`).
        into: when given, a new or empty folder that receives an independent clone (its own
            objects, no remote): writes there never touch the cache. Returned as given.
        url: git URL to clone the tag from first; default ``$MLA_SEAM_UPSTREAM_URL``. On failure
            a warning is logged and the PyPI sdist is used. Ignored when the release is cached.
        cache: cache folder; default :func:`mla_seam.paths.cache_dir`.
        strict: ``url`` was named by the user: a clone that fails is an error (never the sdist),
            and a cached release not cloned from it is reported.

    Returns:
        ``into``, or the cached checkout, which callers must treat as read-only.

    Raises:
        UpstreamError: unknown release, or neither source could provide it.
        UsageError: ``into`` exists and is not an empty folder.
    """
    if into is not None:
        return get_many([ref], into, url=url, cache=cache, strict=strict)
    version = version_for(ref)
    return _materialize(version, _url(url), _cache(cache), strict and bool(url))


def get_many(
    refs: Sequence[str],
    into: Path,
    url: Optional[str] = None,
    *,
    cache: Optional[Path] = None,
    strict: bool = False,
) -> Path:
    """ONE new checkout at ``into`` holding the tags of all ``refs``, HEAD (branch main) at the last.

    Releases built from sdists are root commits, so ``git log A..B`` between two tags is one
    commit: the whole upstream change between the releases.

    Raises:
        UpstreamError: an unknown release, or one that could not be fetched.
        UsageError: no refs, or ``into`` exists and is not an empty folder.
    """
    versions = [version_for(ref) for ref in refs]
    if not versions:
        raise UsageError("no release given", "name at least one tag, version or line")
    into = Path(into)
    _check_target(into)
    sources = {v: _materialize(v, _url(url), _cache(cache), strict and bool(url)) for v in versions}
    created = _claim_target(into)
    try:
        _combine(into, sources, tag_for(versions[-1]))
    except BaseException:
        _release_target(into, created)
        raise
    log.info("checked out %s at %s", ", ".join(tag_for(v) for v in sources), into)
    return into


def get_ref(url: str, ref: str, into: Path) -> Path:
    """A one-commit checkout of any ref of the git repository at ``url`` (a branch such as
    ``main``, a commit id, a tag no release has) in the new or empty folder ``into``.

    No cache and no sdist: the nightly job stages the trees of upstream ``main`` or of a new tag
    this way on its GPU runner.

    Raises:
        UpstreamError: the URL is unreachable or has no such ref.
        UsageError: ``into`` exists and is not an empty folder.
    """
    into = Path(into)
    created = _claim_target(into)
    try:
        commit = gitlayer.clone_ref(url, ref, into)
    except git.GitCommandError as err:
        _release_target(into, created)
        raise UpstreamError(
            f"could not fetch {ref} from {url} ({_reason(err)})",
            "check the URL and that the ref (a branch, tag or commit id) exists there",
        ) from None
    if not (into / "megatron" / "core").is_dir():
        _release_target(into, created)
        raise UpstreamError(f"{url} at {ref} has no megatron/core", "give a Megatron-LM URL")
    log.info("checked out %s (%s) of %s at %s", ref, commit[:12], url, into)
    return into


def _url(url: Optional[str]) -> Optional[str]:
    return url or os.environ.get(URL_ENV) or None


def _combine(into: Path, sources: Dict[str, Path], head_tag: str) -> None:
    repo = gitlayer.init_repo(into)
    try:
        for version, source in sources.items():
            gitlayer.fetch_tags(repo, source, [tag_for(version)])
            if gitlayer.tag_commit(repo, tag_for(version)) is None:
                raise git.GitCommandError(["git", "fetch"], 1, f"{tag_for(version)} not fetched")
        gitlayer.checkout_branch(repo, BRANCH, f"refs/tags/{head_tag}")
    except git.GitCommandError as err:
        raise UpstreamError(
            f"could not copy releases from the cache into {into}: {str(err).strip()}",
            "delete the cache entries under checkouts/ named above and run again",
        ) from err


def _check_target(into: Path) -> None:
    if into.exists() and not into.is_dir():
        raise UsageError(f"--into {into} exists and is not a directory", "give a new folder")
    if into.is_dir() and any(into.iterdir()):
        raise UsageError(
            f"--into {into} is not empty",
            "give a new or empty folder; mla-seam never writes over existing files",
        )


def _claim_target(into: Path) -> bool:
    """Create ``into`` if needed; return whether we created it (for clean-up on failure)."""
    _check_target(into)
    if into.exists():
        return False
    into.mkdir(parents=True)
    return True


def _release_target(into: Path, created: bool) -> None:
    if created:
        shutil.rmtree(into, ignore_errors=True)
        return
    for child in into.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


# --- command line --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mla-seam upstream get|list`` to the top-level parser."""
    parser = subparsers.add_parser(
        "upstream",
        help="Megatron-LM release checkouts (git clone or PyPI sdist), cached",
        description="Megatron-LM release checkouts, from a git URL or the PyPI sdists.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    get_parser = actions.add_parser(
        "get",
        help="print the path of a release checkout",
        description=(
            "Print the path of a git checkout of each REF (tag core_vX.Y.Z present). Without "
            "--into: the cached checkout, read-only. With --into: a new independent clone holding "
            "every REF's tag, HEAD (branch main) at the last. Source: --url (or "
            f"${URL_ENV}) when reachable, else the PyPI megatron-core sdist; a --url named here "
            "that fails is an error, never the sdist. With --url and --into, REF may also be a "
            "branch or commit of that repository (one commit, not cached)."
        ),
    )
    get_parser.add_argument(
        "refs", nargs="+", metavar="REF", help="tag (core_v0.16.1), version (0.16.1) or line (0.16)"
    )
    get_parser.add_argument(
        "--into", type=Path, metavar="DIR", help="make an independent clone in this new folder"
    )
    get_parser.add_argument("--url", help=f"git URL to clone from first (default: ${URL_ENV})")
    get_parser.set_defaults(func=_cmd_get)
    list_parser = actions.add_parser(
        "list",
        help="known releases, their tags, what is cached",
        description=(
            "Releases mla-seam knows: built in (tested, sdist sha256 shipped) and, after "
            "--refresh, those the package index lists (its sha256 recorded, verified on first "
            f"download). Index: ${index.INDEX_ENV}, else $PIP_INDEX_URL, else PyPI."
        ),
    )
    list_parser.add_argument(
        "--refresh", action="store_true", help="ask the package index for new releases first"
    )
    list_parser.add_argument(
        "--pre", action="store_true", help="include pre-releases (rc, dev) and yanked files"
    )
    list_parser.add_argument("--json", action="store_true", help="print a JSON list")
    list_parser.set_defaults(func=_cmd_list)


def _cmd_get(args: argparse.Namespace) -> int:
    if len(args.refs) > 1 and args.into is None:
        raise UsageError("several releases need --into DIR", "add --into, or name one release")
    if args.url and args.into is not None and len(args.refs) == 1 and not _is_release(args.refs[0]):
        path = get_ref(args.url, args.refs[0], args.into)  # a branch or commit of --url
    elif args.into is None:
        path = get(args.refs[0], url=args.url, strict=bool(args.url))
    else:
        path = get_many(args.refs, args.into, url=args.url, strict=bool(args.url))
    output.emit(str(Path(path).resolve()))
    return 0


def _is_release(ref: str) -> bool:
    try:
        version_for(ref)
    except UpstreamError:
        return False
    return True


def discover(include_prereleases: bool = False) -> List[str]:
    """Ask the package index; return the releases it has that are not built in, oldest first.

    Yanked files are never offered; pre-releases only when ``include_prereleases``. The index's
    answer is recorded in the cache, so :func:`get` can materialize those releases (their sdist
    verified against the index's sha256 on first download, and that hash kept).

    Raises:
        UpstreamError: the index is unreachable or unreadable.
    """
    found = index.refresh(RELEASES[0])
    new = index.offered(found, RELEASES, include_prereleases)
    for version in new:
        log.debug("new megatron-core release on the index: %s", version)
    return new


def release_rows(include_prereleases: bool = False) -> List[Dict[str, object]]:
    """Every known release as ``{version, tag, line, prerelease, yanked, source, cached}``."""
    rows: Dict[str, Dict[str, object]] = {}
    for version in RELEASES:
        rows[version] = {"source": "builtin", "sha256": SDIST_SHA256[version], "yanked": False}
    for version, entry in index.indexed().items():
        if version in rows:
            continue
        if not include_prereleases and (entry.get("yanked") or is_prerelease(version)):
            continue
        rows[version] = {
            "source": "index",
            "sha256": index.expected_sha256(version) or entry.get("sha256"),
            "yanked": bool(entry.get("yanked")),
        }
    result = []
    for version in sorted(rows, key=version_key):
        result.append(
            {
                "version": version,
                "tag": tag_of(version),
                "line": line_of(version),
                "prerelease": is_prerelease(version),
                "cached": cached_source(version) is not None,
                **rows[version],
            }
        )
    return result


def _cmd_list(args: argparse.Namespace) -> int:
    if args.refresh:
        new = discover(include_prereleases=args.pre)
        shown = ", ".join(new[:8]) + (f" and {len(new) - 8} more" if len(new) > 8 else "")
        log.info(
            "index %s: %s",
            index.index_url(),
            f"{len(new)} new release(s): {shown}" if new else "no new releases",
        )
    rows = release_rows(include_prereleases=args.pre)
    if args.json:
        output.emit_json(rows)
        return 0
    log.info("cache: %s", cache_dir())
    for row in rows:
        state = "-"
        source = cached_source(str(row["version"])) if row["cached"] else None
        if source is not None:
            state = (
                f"cached (git {source.get('url', '')})"
                if source.get("source") == "git"
                else "cached (sdist)"
            )
        flags = [str(row["source"])]
        flags += ["pre-release"] if row["prerelease"] else []
        flags += ["yanked"] if row["yanked"] else []
        output.emit(f"{row['version']:<12} {row['tag']:<18} {state:<16} {', '.join(flags)}")
    return 0
