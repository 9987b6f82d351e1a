"""Writing a release line: export a commit range as ``patches/<line>/`` and install it atomically.

:func:`write_series` exports ``base..head`` of a repository into a validated line folder
(format-patch files, ``series``, ``manifest.json`` with the pre-images of every release of the
line, by blob id); :func:`export_line` does it for a survey workspace, :func:`export_target` for
a moving target (``main``, ``dev``: one release, the commit it was made from); :func:`install_line`
moves it into ``patches/`` in one rename, so ``patches/`` holds the old line folder or the whole
new one, never a mix. Exports are byte-stable: the same
commits give the same bytes, so a patch whose applied result did not change keeps its bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import git
from mla_seam import gitlayer, paths, releases, upstream
from mla_seam.errors import SeriesCorruptError
from mla_seam.series import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    SERIES_NAME,
    PatchEntry,
    Series,
    apply_patches,
    check_relpath,
    json_bytes,
    load_series,
    patch_files,
)
from mla_seam.survey import Workspace
from mla_seam.tree import crash_point

log = logging.getLogger(__name__)

_STAGING_PREFIX = ".rebase-"


def _sweep_staging(root: Path) -> None:
    """Undo what an interrupted ``--write`` left in ``patches/`` (under the bundle lock-free)."""
    for leftover in sorted(root.glob(f"{_STAGING_PREFIX}old-*")):
        name = leftover.name[len(f"{_STAGING_PREFIX}old-") :].rsplit("-", 1)[0]
        if not (root / name).exists():
            log.warning("mla-seam: restoring %s from an interrupted --write", name)
            os.rename(leftover, root / name)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f"{_STAGING_PREFIX}new-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def install_line(staged: Path, target: Path) -> Dict[str, List[str]]:
    """Move the validated line folder ``staged`` to ``target`` (``patches/<line>``) in one rename.

    Returns:
        ``{"unchanged": [...], "changed": [...], "added": [...], "removed": [...]}`` file names.
    """
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep_staging(root)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if target.is_dir() else {}
    after = {p.name: p.read_bytes() for p in staged.iterdir()}
    delta = {
        "unchanged": sorted(n for n in after if before.get(n) == after[n]),
        "changed": sorted(n for n in after if n in before and before[n] != after[n]),
        "added": sorted(n for n in after if n not in before),
        "removed": sorted(n for n in before if n not in after),
    }
    new = root / f"{_STAGING_PREFIX}new-{target.name}-{os.getpid()}"
    old = root / f"{_STAGING_PREFIX}old-{target.name}-{os.getpid()}"
    try:
        shutil.copytree(staged, new)
        crash_point("rebase-staged")
        with _signals_blocked():  # the two renames happen together or not at all
            if target.exists():
                os.rename(target, old)
            os.rename(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return delta


def _releases_of_line(ws: Workspace, version: str, only: Optional[Sequence[str]]) -> List[str]:
    if only:
        return sorted(set(only) | {version}, key=releases.version_key)
    line = releases.line_of(version)
    known = [v for v in upstream.RELEASES if upstream.line_of(v) == line]
    return sorted(set(known) | {version}, key=releases.version_key)


def _upstream_record(ws: Workspace, onto: str, commit: str, version: str) -> Dict[str, str]:
    message = gitlayer.commit_message(ws.repo, commit)
    if message.startswith(f"megatron-core {version} from PyPI sdist"):
        source = f"pypi-sdist megatron-core=={version}"
    else:
        source = f"git {onto}"
    tag = onto if onto.startswith(upstream.TAG_PREFIX) else f"{upstream.TAG_PREFIX}{version}"
    return {"tag": tag, "commit": commit, "source": source}


def export_line(
    ws: Workspace,
    base: str,
    head: str,
    onto: str,
    version: str,
    out_dir: Path,
    only: Optional[Sequence[str]] = None,
) -> Series:
    """Export ``base..head`` of the workspace as a line folder at ``out_dir`` (validated).

    Every release of the line other than ``version`` is recorded with its own pre-images
    (fetched from the cache where the checkout lacks its tag).
    """
    wanted = _releases_of_line(ws, version, only)
    extra = {}
    for release in wanted:
        if release != version:
            extra[release] = ws.resolve(upstream.tag_for(release))[0]
    overlay = paths.overlay_dir() / paths.ADAPTER_RELPATH
    return write_series(
        ws.repo,
        base,
        head,
        out_dir,
        releases.line_of(version),
        wanted,
        _upstream_record(ws, onto, base, version),
        {paths.ADAPTER_RELPATH: overlay},
        extra_bases=extra,
    )


# --- writing a line folder ------------------------------------------------------------------


def _overlay_blobs(overlay_files: Mapping[str, Union[bytes, os.PathLike]]) -> Dict[str, str]:
    """Blob ids of the overlay files (bytes staged in a temp folder, one hash-object for all)."""
    with tempfile.TemporaryDirectory(prefix="mla-seam-overlay-") as tmp:
        for rel, src in overlay_files.items():
            check_relpath(rel, "overlay")
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        return {rel: blob for rel, blob in sorted(gitlayer.hash_blobs(tmp, overlay_files).items())}


def _post_images_at(
    repo: git.Repo, ref: str, relpaths: Sequence[str], patches: Sequence[PatchEntry], label: str
) -> Dict[str, Optional[str]]:
    """Blob ids the patches make of ``relpaths`` as they are at ``ref`` (applied in scratch)."""
    with tempfile.TemporaryDirectory(prefix="mla-seam-export-") as tmp:
        work = Path(tmp) / "tree"
        for rel in relpaths:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(gitlayer.read_blob(repo, ref, rel))
        apply_patches(patches, work, label=label)
        return gitlayer.hash_blobs(work, relpaths)


def _image_table(
    repo: git.Repo,
    base_ref: str,
    head_ref: str,
    releases: Sequence[str],
    patches: Sequence[PatchEntry],
    extra_bases: Mapping[str, str],
) -> Dict[str, List[dict]]:
    """Manifest ``files``: one pre/post image per touched file and distinct pre-image.

    Every release shares ``base_ref``'s images unless ``extra_bases`` maps it to its own ref;
    such a release joins an image with the same pre-image, or gets one of its own whose
    post-image is computed by applying the patches in a scratch folder.
    """
    touched = sorted({f for p in patches for f in p.files})
    pre = gitlayer.tree_blobs(repo, base_ref, touched)
    post = gitlayer.tree_blobs(repo, head_ref, touched)
    base_releases = [r for r in releases if r not in extra_bases]
    files = {
        rel: [{"releases": base_releases[:], "pre": pre[rel], "post": post[rel]}] for rel in touched
    }
    for release in (r for r in releases if r in extra_bases):
        ref = extra_bases[release]
        pre_x = gitlayer.tree_blobs(repo, ref, touched)
        missing = [rel for rel, blob in pre_x.items() if blob is None]
        if missing:
            raise SeriesCorruptError(
                f"release {release} ({ref}) lacks {missing}",
                "the series cannot serve that release; give it its own line",
            )
        post_x = _post_images_at(repo, ref, touched, patches, f"{release} ({ref})")
        for rel in touched:
            same = [img for img in files[rel] if img["pre"] == pre_x[rel]]
            if same:
                same[0]["releases"].append(release)
            else:
                files[rel].append({"releases": [release], "pre": pre_x[rel], "post": post_x[rel]})
    for images in files.values():
        images[:] = [img for img in images if img["releases"]]
    return files


def write_series(
    repo: git.Repo,
    base_ref: str,
    head_ref: str,
    out_dir: os.PathLike,
    line: str,
    releases: Sequence[str],
    upstream: Mapping[str, object],
    overlay_files: Mapping[str, Union[bytes, os.PathLike]],
    *,
    extra_bases: Optional[Mapping[str, str]] = None,
) -> Series:
    """Export ``base_ref..head_ref`` as the release line in ``out_dir``; return it validated.

    Old ``.patch`` files in ``out_dir`` are replaced. The output is byte-stable: the same
    commits give the same bytes (pinned format-patch flags, sorted-key JSON). No upstream file
    is written: the manifest names each release's pre-images by blob id, and
    :mod:`mla_seam.preimages` obtains them when they are needed.

    Args:
        repo: repository holding both refs.
        base_ref: the upstream release commit the series applies to.
        head_ref: base plus one commit per hook patch.
        out_dir: the line folder, e.g. ``patches/core_v0.16``.
        line: the line's short name (``"0.16"``).
        releases: releases the line serves; all of them share base_ref's pre-images unless
            ``extra_bases`` names another commit for a release.
        upstream: provenance recorded as the manifest's ``upstream`` object.
        overlay_files: tree-relative path -> bytes (or a file path) of each overlay file.
        extra_bases: release -> ref of that release, for releases whose touched files may
            differ from base_ref's; their pre-images and post-images are recorded too.

    Raises:
        SeriesCorruptError: the range is empty, or a patch does more than edit files.
        PatchFailedError: the patches do not apply to an extra base.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.patch"):
        old.unlink()
    exported = gitlayer.format_patch(repo, f"{base_ref}..{head_ref}", out)
    if not exported:
        raise SeriesCorruptError(f"{base_ref}..{head_ref} has no commits", "commit the hooks first")
    patches = []
    for path in (out / p.name for p in exported):
        data = path.read_bytes()
        touched = patch_files(data, f"{out.name}/{path.name}")
        patches.append(
            PatchEntry(path.name, path, hashlib.sha256(data).hexdigest(), tuple(sorted(touched)))
        )
    files = _image_table(repo, base_ref, head_ref, releases, patches, extra_bases or {})
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "line": line,
        "releases": list(releases),
        "upstream": dict(upstream),
        "overlay": _overlay_blobs(overlay_files),
        "patches": [{"name": p.name, "sha256": p.sha256, "files": list(p.files)} for p in patches],
        "files": files,
    }
    (out / SERIES_NAME).write_bytes("".join(p.name + "\n" for p in patches).encode())
    (out / MANIFEST_NAME).write_bytes(json_bytes(manifest))
    return load_series(out)


def export_target(
    ws: Workspace, base: str, head: str, onto: str, target: str, out_dir: Path
) -> Series:
    """Export ``base..head`` as the series of the moving target ``target`` (``main``, ``dev``).

    The series serves one release, the commit it was made from (``dev@d48bd6be0a``,
    :func:`mla_seam.releases.snapshot`); later commits of the branch are served where its hunks
    apply strictly (:mod:`mla_seam.selection`).
    """
    overlay = paths.overlay_dir() / paths.ADAPTER_RELPATH
    return write_series(
        ws.repo,
        base,
        head,
        out_dir,
        target,
        [releases.snapshot(target, base)],
        {"tag": target, "commit": base, "source": f"git {onto}"},
        {paths.ADAPTER_RELPATH: overlay},
    )
