"""Series data model: load/validate ``patches/<line>/``, find a line, export one byte-stably.

The helpers the apply tests share (a SYNTHETIC bundle: overlay + series for 0.16 and 0.19 made
with :func:`mla_seam.export.write_series` from real upstream checkouts plus small committed
hooks; writable tree copies, a CLI runner and tree snapshots) are in ``support.py``, their
fixtures (``bundle``, ``make_tree``, ``seam_base``, ``seam_env``) in ``conftest.py``. Everything
runs real git on real trees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import pytest
from mla_seam import gitlayer, preimages, releases
from mla_seam.errors import SeriesCorruptError, UnsafePathError, UnsupportedVersionError, UsageError
from mla_seam.export import write_series
from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.series import (
    MANIFEST_NAME,
    SERIES_NAME,
    find_series,
    load_series,
    patch_files,
    series_by_name,
)

from support import (  # noqa: F401
    LM,
    MLA,
    REPO_ROOT,
    SYNTHETIC_ADAPTER,
    TC,
    commit,
)


@pytest.fixture
def line16(bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of the synthetic core_v0.16 line folder."""
    return Path(shutil.copytree(bundle / "patches" / "core_v0.16", tmp_path / "core_v0.16"))


def _rewrite_manifest(line_dir: Path, edit: Callable[[dict], None]) -> None:
    path = line_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _forge_patch(line_dir: Path, index: int, data: bytes) -> None:
    """Replace patch ``index`` with ``data`` and fix its sha256, so only the content is bad."""
    manifest = json.loads((line_dir / "manifest.json").read_text())
    name = manifest["patches"][index]["name"]
    (line_dir / name).write_bytes(data)

    def fix(m: dict) -> None:
        m["patches"][index]["sha256"] = hashlib.sha256(data).hexdigest()

    _rewrite_manifest(line_dir, fix)


def test_load_synthetic_series(line16: Path) -> None:
    series = load_series(line16)
    assert series.name == "core_v0.16" and series.line == "0.16"
    assert series.releases == ("0.16.0", "0.16.1")
    assert [p.name[:5] for p in series.patches] == ["0001-", "0002-", "0003-"]
    assert series.touched == sorted([MLA, TC, LM])
    assert series.patches[1].files == tuple(sorted([MLA, TC]))
    assert list(series.overlay) == [ADAPTER_RELPATH]
    # MLA differs at the variant release: two images; the others share one image.
    assert len(series.files[MLA]) == 2 and len(series.files[TC]) == 1
    assert set(series.images_for("0.16.0")[MLA][0].releases) == {"0.16.0"}
    assert len(series.images_for("0.20.0")[MLA]) == 2  # forced line: every image counts


def test_write_series_is_byte_stable(
    fresh_checkout: Callable[[str, Path], Path], seam_base: Path, bundle: Path, tmp_path: Path
) -> None:
    repo = gitlayer.open_repo(seam_base / "work-0.19")
    base = repo.git.rev_list("--max-parents=0", "HEAD")
    args = ("0.19", ["0.19.2"], {"tag": "core_v0.19.2", "commit": base, "source": "test"})
    outs = []
    for n in (1, 2):
        out = tmp_path / f"export{n}"
        (out).mkdir()
        (out / "0009-stale.patch").write_text("left over from an older export\n")
        write_series(repo, base, "HEAD", out, *args, {ADAPTER_RELPATH: SYNTHETIC_ADAPTER})
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    assert "0009-stale.patch" not in outs[0]
    assert outs[0] == {
        p.name: p.read_bytes() for p in sorted((bundle / "patches/core_v0.19").iterdir())
    }
    manifest = outs[0]["manifest.json"]
    assert (
        manifest.endswith(b"}\n")
        and manifest == (json.dumps(json.loads(manifest), indent=2, sort_keys=True) + "\n").encode()
    )
    names = [p["name"] for p in json.loads(manifest)["patches"]]
    assert outs[0]["series"].decode().splitlines() == names


def test_series_file_matches_manifest_order(line16: Path) -> None:
    manifest = json.loads((line16 / "manifest.json").read_text())
    names = (line16 / "series").read_text().splitlines()
    assert names == [p["name"] for p in manifest["patches"]]


def test_series_file_comments_and_blanks_are_allowed(line16: Path) -> None:
    names = (line16 / "series").read_text().splitlines()
    (line16 / "series").write_text("# hooks, in order\n\n" + "\n".join(names) + "\n\n")
    assert len(load_series(line16).patches) == 3


def test_tampered_patch_sha256(line16: Path) -> None:
    patch = sorted(line16.glob("0002-*.patch"))[0]
    patch.write_bytes(patch.read_bytes().replace(b"hook H2", b"hook HX"))
    with pytest.raises(SeriesCorruptError, match=r"(?s)0002-.*sha256.*rebase --write"):
        load_series(line16)


@pytest.mark.parametrize(
    "old, new, error, match",
    [
        (b"a/" + MLA.encode(), b"a/../" + MLA.encode(), UnsafePathError, r"escapes the tree"),
        (b"b/" + MLA.encode(), b"b/../" + MLA.encode(), UnsafePathError, r"escapes the tree"),
        (b"a/" + MLA.encode(), b"a//etc/" + MLA.encode(), UnsafePathError, r"absolute path"),
        (b"--- a/" + MLA.encode(), b"--- /etc/passwd", UnsafePathError, r"absolute path"),
        (b"a/" + MLA.encode(), b"a/.git/hooks/x", UnsafePathError, r"\.git"),
        (b"a/" + MLA.encode(), b"a/./" + MLA.encode(), UnsafePathError, r"not normalized"),
        (b"index ", b"new file mode 100644\nindex ", SeriesCorruptError, r"creates a file"),
        (b"--- a/" + MLA.encode(), b"--- " + MLA.encode(), SeriesCorruptError, r"a/ prefix"),
    ],
    ids=[
        "dotdot-a",
        "dotdot-b",
        "absolute-diff-git",
        "absolute-minus",
        "into-git",
        "dot",
        "creates-file",
        "no-prefix",
    ],
)
def test_patch_header_paths_are_validated(
    line16: Path, old: bytes, new: bytes, error, match
) -> None:
    name = sorted(line16.glob("0001-*.patch"))[0]
    data = name.read_bytes()
    assert old in data
    _forge_patch(line16, 0, data.replace(old, new))
    with pytest.raises(error, match=match):
        load_series(line16)


def test_removed_line_starting_with_dashes_is_not_a_header() -> None:
    patch = (
        b"From 0000 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] x\n\n---\n"
        b"diff --git a/f.py b/f.py\nindex 1..2 100644\n--- a/f.py\n+++ b/f.py\n"
        b"@@ -1,2 +1,2 @@\n a\n--- /etc/passwd\n+++ /etc/shadow\n"
    )
    assert patch_files(patch, "t") == ("f.py",)


def test_truncated_hunk_is_refused() -> None:
    patch = b"diff --git a/f.py b/f.py\n--- a/f.py\n+++ b/f.py\n@@ -1,3 +1,3 @@\n a\n"
    with pytest.raises(SeriesCorruptError, match="truncated"):
        patch_files(patch, "t")


def test_extra_patch_file(line16: Path) -> None:
    (line16 / "0004-sneaky.patch").write_bytes(sorted(line16.glob("0001-*"))[0].read_bytes())
    with pytest.raises(SeriesCorruptError, match=r"not in the series: 0004-sneaky.patch"):
        load_series(line16)


def test_series_order_mismatch(line16: Path) -> None:
    names = (line16 / "series").read_text().splitlines()
    (line16 / "series").write_text("\n".join([names[1], names[0], names[2]]) + "\n")
    with pytest.raises(SeriesCorruptError, match=r"order"):
        load_series(line16)


def test_manifest_lists_missing_patch(line16: Path) -> None:
    sorted(line16.glob("0003-*.patch"))[0].unlink()
    with pytest.raises(SeriesCorruptError, match=r"0003-.*missing"):
        load_series(line16)


def test_manifest_schema_unknown(line16: Path) -> None:
    _rewrite_manifest(line16, lambda m: m.update(schema=2))
    with pytest.raises(SeriesCorruptError, match=r"schema 2"):
        load_series(line16)


def test_files_listed_must_equal_files_touched(line16: Path) -> None:
    def drop(m: dict) -> None:
        del m["files"][LM]

    _rewrite_manifest(line16, drop)
    with pytest.raises(SeriesCorruptError, match=r"'files' lists"):
        load_series(line16)


def test_patch_files_entry_must_match_headers(line16: Path) -> None:
    _rewrite_manifest(line16, lambda m: m["patches"][0].update(files=[TC]))
    with pytest.raises(SeriesCorruptError, match=r"0001-.*edits"):
        load_series(line16)


def test_manifest_path_escaping(line16: Path) -> None:
    def escape(m: dict) -> None:
        m["overlay"] = {"../outside.py": m["overlay"][ADAPTER_RELPATH]}

    _rewrite_manifest(line16, escape)
    with pytest.raises(UnsafePathError, match=r"outside.py"):
        load_series(line16)


def test_empty_series_folder(tmp_path: Path) -> None:
    (tmp_path / "core_v0.99").mkdir()
    with pytest.raises(SeriesCorruptError, match=r"manifest.json is missing"):
        load_series(tmp_path / "core_v0.99")


def test_find_series_by_release(bundle: Path) -> None:
    assert find_series("0.16.0", bundle / "patches").name == "core_v0.16"
    assert find_series("0.19.2", bundle / "patches").name == "core_v0.19"


def test_find_series_unsupported_lists_lines(bundle: Path) -> None:
    with pytest.raises(UnsupportedVersionError) as info:
        find_series("0.17.1", bundle / "patches")
    text = str(info.value)
    assert "core_v0.16 (0.16.0, 0.16.1)" in text and "core_v0.19 (0.19.2)" in text
    assert "--series LINE" in text


def test_series_by_name(bundle: Path) -> None:
    assert series_by_name("core_v0.19", bundle / "patches").name == "core_v0.19"
    assert series_by_name("0.16", bundle / "patches").name == "core_v0.16"
    with pytest.raises(UsageError, match=r"core_v0.42"):
        series_by_name("core_v0.42", bundle / "patches")


REAL_LINES = sorted(p.parent.name for p in (REPO_ROOT / "patches").glob("*/manifest.json"))


@pytest.mark.skipif(not REAL_LINES, reason="the real series (patches/core_v*) are not written yet")
@pytest.mark.parametrize("line", REAL_LINES)
def test_real_series_load(line: str) -> None:
    series = load_series(REPO_ROOT / "patches" / line)
    assert series.patches and series.overlay
    blobs = gitlayer.hash_blobs(REPO_ROOT / "overlay", list(series.overlay))
    assert blobs == dict(series.overlay), "overlay/ and the manifest disagree: re-export the line"


@pytest.mark.parametrize("line", REAL_LINES)
def test_real_series_ship_no_upstream_file(line: str) -> None:
    """A line folder holds our own files only (series, manifest, patches): the release files
    a series was made for are named by blob id, never copied into the bundle."""
    folder = REPO_ROOT / "patches" / line
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n not in (SERIES_NAME, MANIFEST_NAME)] == sorted(
        p.name for p in load_series(folder).patches
    )
    assert "pre_images" not in json.loads((folder / MANIFEST_NAME).read_bytes())


@pytest.mark.parametrize("line", [n for n in REAL_LINES if n not in releases.MOVING_TARGETS])
def test_real_series_pre_images_come_from_the_sdists(line: str) -> None:
    """Every pre-image a release line's manifest records is in the PyPI sdist of a release it
    lists (sha256-verified sdist, each file checked against its blob id): ``--3way`` and a
    rebuilt revert have them on any clone, and main and dev take theirs from the user's clone."""
    series = load_series(REPO_ROOT / "patches" / line)
    pres = {img.pre for imgs in series.files.values() for img in imgs}
    found, problems = preimages.from_sdists(series, pres, download=True)
    assert not problems and sorted(found) == sorted(pres), problems
    assert all(gitlayer.blob_id(data) == blob for blob, data in found.items())


def test_synthetic_export_records_pre_images_by_blob_only(bundle: Path) -> None:
    folder = bundle / "patches" / "core_v0.16"
    series = load_series(folder)
    pres = {img.pre for imgs in series.files.values() for img in imgs}
    assert len(pres) == 4  # MLA differs at the variant release
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".patch")) == [
        MANIFEST_NAME,
        SERIES_NAME,
    ]
