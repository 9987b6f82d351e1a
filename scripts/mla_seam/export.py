"""Writing a release line: export a commit range as ``patches/<line>/`` and install it atomically.

:func:`export_line` turns ``base..head`` of a survey workspace into a validated line folder
(format-patch files, ``series``, ``manifest.json`` with the pre-images of every release of the
line), :func:`export_target` the same for a moving target (``main``, ``dev``: one release, the
commit it was made from); :func:`install_line` moves it into ``patches/`` in one rename, so ``patches/`` holds the
old line folder or the whole new one, never a mix. Exports are byte-stable: the same commits
give the same bytes, so a patch whose applied result did not change keeps its bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from mla_seam import gitlayer, paths, releases, upstream
from mla_seam.series import Series, write_series
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
