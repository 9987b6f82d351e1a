"""The patch series data model: load and validate a release line's folder, find one, write one.

A release line lives in ``patches/<line>/`` (format: ``patches/README.md``): a ``series`` file
giving the order, ``manifest.json`` (schema 1) and the ``.patch`` files; the release files a
series was made for are named by blob id only (obtained on demand: :mod:`mla_seam.preimages`).
:func:`load_series` refuses anything that does not match the manifest exactly (hashes, order,
touched files, safe paths), so that apply can trust what it reads; :meth:`Series.apply_in` runs
the patches on a scratch folder. Writing a line: :func:`mla_seam.export.write_series`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import git
from mla_seam import gitlayer, paths
from mla_seam.errors import (
    PatchFailedError,
    SeriesCorruptError,
    UnsafePathError,
    UnsupportedVersionError,
    UsageError,
)
from mla_seam.releases import line_order

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1
MANIFEST_NAME = "manifest.json"
SERIES_NAME = "series"
_HEX_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HUNK_RE = re.compile(rb"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_CHECKING_RE = re.compile(r"^Checking patch (.+)\.\.\.$")
_OFFSET_RE = re.compile(r"^Hunk #(\d+) succeeded at (\d+) \(offset (-?\d+) lines?\)\.$")
# Extended header lines that would make a patch do more than edit an existing file in place.
_REFUSED_HEADERS = {
    b"new file mode": "creates a file (new files belong in overlay/)",
    b"deleted file mode": "deletes a file",
    b"rename from": "renames a file",
    b"copy from": "copies a file",
    b"old mode": "changes a file mode",
    b"GIT binary patch": "carries a binary hunk",
    b"Binary files": "carries a binary change",
}


@dataclasses.dataclass(frozen=True)
class FileImage:
    """One recorded pre-image of a touched file and the post-image the series makes of it."""

    releases: Tuple[str, ...]
    pre: str
    post: str


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One patch of the series: its file, checksum and the tree files it edits."""

    name: str
    path: Path
    sha256: str
    files: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Offset:
    """A hunk that applied at another line than the patch says (never with fuzz)."""

    patch: str
    file: str
    hunk: int
    line: int
    offset: int

    def __str__(self) -> str:
        return f"{self.patch}: {self.file} hunk #{self.hunk} at line {self.line} ({self.offset:+d})"


@dataclasses.dataclass(frozen=True)
class PatchResult:
    """What happened to one patch in :meth:`Series.apply_in`."""

    name: str
    ok: bool
    offsets: Tuple[Offset, ...] = ()
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Series:
    """A validated release line: everything apply needs, read from ``patches/<line>/``."""

    name: str
    line_dir: Path
    line: str
    releases: Tuple[str, ...]
    upstream: Mapping[str, object]
    overlay: Mapping[str, str]
    patches: Tuple[PatchEntry, ...]
    files: Mapping[str, Tuple[FileImage, ...]]
    sha256: str

    @property
    def touched(self) -> List[str]:
        """The tree files the patches edit, sorted."""
        return sorted(self.files)

    def images_for(self, release: str) -> Dict[str, Tuple[FileImage, ...]]:
        """Pre/post images per touched file recorded for ``release``.

        A release the line does not list (a forced ``--series`` on a main checkout) may match
        any recorded image.
        """
        if release not in self.releases:
            return dict(self.files)
        return {
            rel: tuple(img for img in imgs if release in img.releases)
            for rel, imgs in self.files.items()
        }

    def apply_in(
        self, workdir: os.PathLike, *, reverse: bool = False, stop_on_error: bool = True
    ) -> List[PatchResult]:
        """Apply this series' patches to ``workdir``; see :func:`apply_patches`."""
        return apply_patches(
            self.patches, workdir, label=self.name, reverse=reverse, stop_on_error=stop_on_error
        )


def apply_patches(
    patches: Sequence[PatchEntry],
    workdir: os.PathLike,
    *,
    label: str,
    reverse: bool = False,
    stop_on_error: bool = True,
) -> List[PatchResult]:
    """Apply ``patches`` in order (reversed, in reverse order, when ``reverse``) to ``workdir``.

    Strict: git apply without fuzz. Each patch is all-or-nothing; offsets are collected from
    git's verbose report.

    Raises:
        PatchFailedError: a patch does not apply and ``stop_on_error`` is set.
    """
    results: List[PatchResult] = []
    for patch in reversed(patches) if reverse else patches:
        try:
            report = gitlayer.apply_patch(workdir, patch.path, reverse=reverse)
        except git.GitCommandError as exc:
            error = _git_error_text(exc)
            if stop_on_error:
                raise PatchFailedError(
                    f"{label}/{patch.name} does not apply{' in reverse' if reverse else ''} "
                    f"to {', '.join(patch.files)}: {error}",
                    "the file's content is not what the series was made for; run "
                    "`mla-seam apply --check` for a per-file report",
                ) from None
            results.append(PatchResult(patch.name, False, (), error))
            continue
        results.append(PatchResult(patch.name, True, _parse_offsets(patch.name, report)))
    return results


def _git_error_text(exc: git.GitCommandError) -> str:
    """The ``error:`` lines of a failed git command, joined (its stderr if there are none)."""
    text = str(exc.stderr or "").strip().strip("'").strip()
    errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return "; ".join(errors) if errors else text


def _parse_offsets(patch: str, report: str) -> Tuple[Offset, ...]:
    """Hunks that landed at an offset, from ``git apply --verbose`` output."""
    offsets: List[Offset] = []
    current = ""
    for line in report.splitlines():
        checking = _CHECKING_RE.match(line.strip())
        if checking:
            current = checking.group(1)
            continue
        moved = _OFFSET_RE.match(line.strip())
        if moved:
            hunk, at, off = (int(g) for g in moved.groups())
            offsets.append(Offset(patch, current, hunk, at, off))
    return tuple(offsets)


# --- paths ---------------------------------------------------------------------------------


def check_relpath(relpath: str, where: str) -> str:
    """Return ``relpath`` if it is a safe tree-relative path, else raise UnsafePathError.

    Safe: relative, normalized (no empty, ``.`` or ``..`` component, no trailing slash), POSIX
    separators only, and nowhere inside a ``.git`` folder.
    """
    hint = "the series is unsafe to apply; restore patches/ from the mla-seam repository"
    if not relpath or "\0" in relpath:
        raise UnsafePathError(f"{where}: empty or NUL-carrying path", hint)
    if relpath.startswith("/") or re.match(r"^[A-Za-z]:", relpath) or "\\" in relpath:
        raise UnsafePathError(f"{where}: absolute path {relpath!r}", hint)
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(
            f"{where}: path {relpath!r} is not normalized or escapes the tree", hint
        )
    if any(part.lower() == ".git" for part in parts):
        raise UnsafePathError(f"{where}: path {relpath!r} points into .git", hint)
    return relpath


def _header_path(value: bytes, prefix: bytes, where: str) -> str:
    """The tree path of a ``---``/``+++`` header value such as ``a/megatron/core/x.py``."""
    if value.endswith(b"\t"):
        value = value[:-1]  # git adds a TAB after names that contain a space
    if value == b"/dev/null":
        raise SeriesCorruptError(
            f"{where}: creates or deletes a file",
            "patches may only edit existing files; new files belong in overlay/",
        )
    if value.startswith(b"/"):
        raise UnsafePathError(
            f"{where}: absolute path {value.decode(errors='replace')!r}",
            "the series is unsafe to apply; restore patches/ from the mla-seam repository",
        )
    if value.startswith(b'"'):
        raise SeriesCorruptError(
            f"{where}: quoted path {value.decode(errors='replace')} is not supported",
            "re-export the series with `mla-seam rebase --write`",
        )
    if not value.startswith(prefix):
        raise SeriesCorruptError(
            f"{where}: path {value.decode(errors='replace')!r} lacks the {prefix.decode()} prefix",
            "re-export the series with `mla-seam rebase --write` (git format-patch output)",
        )
    try:
        text = value[len(prefix) :].decode("utf-8")
    except UnicodeDecodeError:
        raise SeriesCorruptError(f"{where}: path is not UTF-8", "re-export the series") from None
    return check_relpath(text, where)


def _diff_git_path(rest: bytes, where: str) -> str:
    """The path of a ``diff --git a/X b/X`` line (renames are refused, so both sides agree).

    Every split at `` b/`` is tried; unsafe paths are reported as such before a mismatch.
    """
    if rest.startswith(b'"'):
        return _header_path(rest, b"a/", where)  # raises: quoted
    splits = [i for i in range(len(rest)) if rest.startswith(b" b/", i)]
    for i in splits:
        if rest[2:i] == rest[i + 3 :]:
            return _header_path(rest[:i], b"a/", where)
    if splits:
        _header_path(rest[: splits[0]], b"a/", where)
        _header_path(rest[splits[0] + 1 :], b"b/", where)
    raise SeriesCorruptError(
        f"{where}: 'diff --git' line does not name one file as a/X b/X",
        "patches may only edit a file in place; re-export the series",
    )


def patch_files(data: bytes, where: str) -> Tuple[str, ...]:
    """Validated tree paths a patch edits, in order, read from its headers.

    Hunk bodies are skipped by their line counts, so a removed line that starts with ``--``
    is never mistaken for a header.

    Raises:
        SeriesCorruptError: malformed patch, or one that does more than edit files in place.
        UnsafePathError: a path that is absolute, escapes the tree or points into ``.git``.
    """
    files: List[str] = []
    current: Optional[str] = None
    old_left = new_left = 0
    for raw in data.split(b"\n"):
        if old_left > 0 or new_left > 0:
            old_left, new_left = _consume_hunk_line(raw, old_left, new_left, where)
            continue
        if raw.startswith(b"diff --git "):
            current = _diff_git_path(
                raw[len(b"diff --git ") :], f"{where} ({raw[11:].decode(errors='replace')})"
            )
            files.append(current)
            continue
        if current is None:
            continue  # mail header and commit message
        for prefix, what in _REFUSED_HEADERS.items():
            if raw.startswith(prefix):
                raise SeriesCorruptError(
                    f"{where}: {current} {what}",
                    "patches may only edit existing text files in place; new files belong in "
                    "overlay/",
                )
        if raw.startswith(b"--- ") or raw.startswith(b"+++ "):
            prefix = b"a/" if raw.startswith(b"--- ") else b"b/"
            if _header_path(raw[4:], prefix, where) != current:
                raise SeriesCorruptError(
                    f"{where}: header {raw.decode(errors='replace')!r} does not match {current}",
                    "re-export the series with `mla-seam rebase --write`",
                )
            continue
        hunk = _HUNK_RE.match(raw)
        if hunk:
            old_left = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new_left = int(hunk.group(2)) if hunk.group(2) is not None else 1
    if old_left > 0 or new_left > 0:
        raise SeriesCorruptError(f"{where}: the last hunk is truncated", "re-export the series")
    if not files:
        raise SeriesCorruptError(f"{where}: contains no diff", "re-export the series")
    return tuple(dict.fromkeys(files))


def _consume_hunk_line(raw: bytes, old_left: int, new_left: int, where: str) -> Tuple[int, int]:
    """Count one hunk body line against the hunk's remaining old/new line counts."""
    tag = raw[:1]
    if tag in (b" ", b""):
        old_left, new_left = old_left - 1, new_left - 1
    elif tag == b"-":
        old_left -= 1
    elif tag == b"+":
        new_left -= 1
    elif tag != b"\\":
        raise SeriesCorruptError(
            f"{where}: unexpected line in a hunk: {raw[:60].decode(errors='replace')!r}",
            "the patch is damaged; re-export the series with `mla-seam rebase --write`",
        )
    if old_left < 0 or new_left < 0:
        raise SeriesCorruptError(
            f"{where}: a hunk is longer than its header says", "re-export the series"
        )
    return old_left, new_left


# --- loading -------------------------------------------------------------------------------


def _corrupt(line_dir: Path, what: str, hint: str = "") -> SeriesCorruptError:
    return SeriesCorruptError(
        f"series {line_dir}: {what}",
        hint
        or "restore patches/ from the mla-seam repository, or re-export the line with "
        "`mla-seam rebase --write`",
    )


def _read_manifest(line_dir: Path) -> Tuple[dict, bytes]:
    """Parse ``manifest.json`` and check its schema number; return it and its bytes."""
    path = line_dir / MANIFEST_NAME
    if not line_dir.is_dir():
        raise _corrupt(line_dir, "no such folder")
    if not path.is_file():
        raise _corrupt(line_dir, f"{MANIFEST_NAME} is missing (empty or unfinished series folder)")
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise _corrupt(line_dir, f"{MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _corrupt(line_dir, f"{MANIFEST_NAME} is not a JSON object")
    schema = manifest.get("schema")
    if schema != MANIFEST_SCHEMA:
        raise _corrupt(
            line_dir,
            f"{MANIFEST_NAME} has schema {schema!r}; this mla-seam reads schema {MANIFEST_SCHEMA}",
            "use the mla-seam version that wrote this series (or upgrade mla-seam)",
        )
    return manifest, data


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_series_file(line_dir: Path) -> List[str]:
    """Patch names from the ``series`` file: one per line, blanks and ``#`` comments skipped."""
    path = line_dir / SERIES_NAME
    if not path.is_file():
        raise _corrupt(line_dir, f"the '{SERIES_NAME}' file is missing")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    return names


def _load_patches(line_dir: Path, manifest: dict) -> Tuple[PatchEntry, ...]:
    """Check the patch list against the folder, the ``series`` file and each patch's bytes."""
    listed = manifest.get("patches")
    if not isinstance(listed, list) or not listed:
        raise _corrupt(line_dir, "manifest 'patches' must be a non-empty list")
    entries: List[PatchEntry] = []
    for item in listed:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("sha256"), str)
            and _SHA256_RE.match(item["sha256"])
            and _str_list(item.get("files"))
        ):
            raise _corrupt(line_dir, f"malformed patch entry in the manifest: {item!r}")
        entries.append(_load_patch(line_dir, item))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise _corrupt(line_dir, "the manifest lists a patch twice")
    order = _read_series_file(line_dir)
    if order != names:
        raise _corrupt(
            line_dir,
            f"'{SERIES_NAME}' order {order} differs from the manifest's {names}",
        )
    extra = sorted(p.name for p in line_dir.glob("*.patch") if p.name not in names)
    if extra:
        raise _corrupt(
            line_dir,
            f"patch files not in the series: {', '.join(extra)}",
            "delete them, or add them with `mla-seam rebase --write`",
        )
    return tuple(entries)


def _load_patch(line_dir: Path, item: dict) -> PatchEntry:
    """One manifest patch entry, checked against the file's sha256 and its headers."""
    name = item["name"]
    if "/" in name or not name.endswith(".patch") or name.startswith("."):
        raise _corrupt(line_dir, f"bad patch file name {name!r}")
    path = line_dir / name
    if not path.is_file():
        raise _corrupt(line_dir, f"patch {name} is listed in the manifest but missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != item["sha256"]:
        raise _corrupt(
            line_dir,
            f"patch {name} has sha256 {digest}, the manifest says {item['sha256']} "
            "(edited by hand?)",
            "restore the patch from git, or re-export the line with `mla-seam rebase --write`",
        )
    touched = patch_files(data, f"{line_dir.name}/{name}")
    if sorted(touched) != sorted(item["files"]):
        raise _corrupt(
            line_dir,
            f"patch {name} edits {sorted(touched)}, the manifest says {sorted(item['files'])}",
        )
    return PatchEntry(name, path, digest, tuple(sorted(touched)))


def _load_files(
    line_dir: Path, manifest: dict, releases: Sequence[str], patches: Sequence[PatchEntry]
) -> Dict[str, Tuple[FileImage, ...]]:
    """The per-file pre/post images, checked against what the patches touch."""
    raw = manifest.get("files")
    if not isinstance(raw, dict):
        raise _corrupt(line_dir, "manifest 'files' must be an object")
    touched = sorted({f for p in patches for f in p.files})
    if sorted(raw) != touched:
        raise _corrupt(
            line_dir, f"manifest 'files' lists {sorted(raw)}, the patches touch {touched}"
        )
    files: Dict[str, Tuple[FileImage, ...]] = {}
    for rel, images in raw.items():
        check_relpath(rel, f"{line_dir.name}/{MANIFEST_NAME}")
        if not isinstance(images, list) or not images:
            raise _corrupt(line_dir, f"no pre/post images for {rel}")
        parsed = []
        for img in images:
            if not (
                isinstance(img, dict)
                and _str_list(img.get("releases"))
                and all(
                    isinstance(img.get(k), str) and _HEX_RE.match(img[k]) for k in ("pre", "post")
                )
            ):
                raise _corrupt(line_dir, f"malformed image entry for {rel}: {img!r}")
            parsed.append(FileImage(tuple(img["releases"]), img["pre"], img["post"]))
        covered = {r for img in parsed for r in img.releases}
        if covered != set(releases):
            raise _corrupt(
                line_dir,
                f"images of {rel} cover releases {sorted(covered)}, the line has "
                f"{list(releases)}",
            )
        files[rel] = tuple(parsed)
    return files


def _load_overlay(line_dir: Path, manifest: dict, touched: Iterable[str]) -> Dict[str, str]:
    overlay = manifest.get("overlay")
    if not isinstance(overlay, dict) or not all(
        isinstance(v, str) and _HEX_RE.match(v) for v in overlay.values()
    ):
        raise _corrupt(line_dir, "manifest 'overlay' must map paths to git blob ids")
    for rel in overlay:
        check_relpath(rel, f"{line_dir.name}/{MANIFEST_NAME} overlay")
    clash = sorted(set(overlay) & set(touched))
    if clash:
        raise _corrupt(line_dir, f"overlay files are also patched: {clash}")
    return dict(overlay)


def load_series(line_dir: os.PathLike) -> Series:
    """Load ``patches/<line>/`` and validate it completely.

    Raises:
        SeriesCorruptError: schema, missing/extra/edited patches, order, or file lists disagree.
        UnsafePathError: a patch or manifest path is absolute, escapes the tree or enters .git.
    """
    line_dir = Path(line_dir)
    manifest, data = _read_manifest(line_dir)
    line, releases, upstream = (manifest.get(k) for k in ("line", "releases", "upstream"))
    if not isinstance(line, str) or not _str_list(releases) or not releases:
        raise _corrupt(line_dir, "manifest needs 'line' (string) and 'releases' (non-empty list)")
    if not isinstance(upstream, dict):
        raise _corrupt(line_dir, "manifest 'upstream' must be an object")
    patches = _load_patches(line_dir, manifest)
    files = _load_files(line_dir, manifest, releases, patches)
    overlay = _load_overlay(line_dir, manifest, files)
    return Series(
        name=line_dir.name,
        line_dir=line_dir,
        line=line,
        releases=tuple(releases),
        upstream=dict(upstream),
        overlay=overlay,
        patches=patches,
        files=files,
        sha256=hashlib.sha256(data).hexdigest(),
    )


# --- finding -------------------------------------------------------------------------------


def _line_dirs(root: Path) -> List[Path]:
    """Line folders in the order tools show them (releases, then main and dev)."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return [root / name for name in line_order(names)]


def _releases_of(line_dir: Path) -> Optional[List[str]]:
    """The ``releases`` of a line's manifest, read leniently (``None`` if unreadable)."""
    try:
        releases = json.loads((line_dir / MANIFEST_NAME).read_bytes()).get("releases")
    except (OSError, ValueError, AttributeError):
        return None
    return releases if _str_list(releases) else None


def supported_lines(root: Optional[os.PathLike] = None) -> str:
    """``core_v0.16 (0.16.0, 0.16.1); ...`` for messages."""
    root = Path(root) if root is not None else paths.patches_dir()
    parts = []
    for line_dir in _line_dirs(root):
        releases = _releases_of(line_dir)
        shown = ", ".join(releases) if releases is not None else "unreadable manifest"
        parts.append(f"{line_dir.name} ({shown})")
    return "; ".join(parts) or "none"


def find_series(version: str, root: Optional[os.PathLike] = None) -> Series:
    """The validated line whose manifest ``releases`` lists ``version``.

    Raises:
        UnsupportedVersionError: no line lists it (the message lists what is supported).
    """
    root = Path(root) if root is not None else paths.patches_dir()
    for line_dir in _line_dirs(root):
        releases = _releases_of(line_dir)
        if releases is not None and version in releases:
            return load_series(line_dir)
    raise UnsupportedVersionError(
        f"megatron-core {version} has no patch series; supported: {supported_lines(root)}",
        "check out a supported release, or force a line with `--series LINE` "
        "(for example on a main checkout: --series core_v0.19)",
    )


def series_by_name(
    name: str, root: Optional[os.PathLike] = None, option: str = "--series"
) -> Series:
    """The line forced with ``--series``: a folder name (``core_v0.16``) or its ``line`` (``0.16``).

    ``option`` is the command-line option that named it, for the error (``--from``,
    ``--baseline``).

    Raises:
        UsageError: no such line.
    """
    root = Path(root) if root is not None else paths.patches_dir()
    for line_dir in _line_dirs(root):
        if line_dir.name in (name, f"core_v{name}"):
            return load_series(line_dir)
    raise UsageError(
        f"{option} {name}: no such release line; available: {supported_lines(root)}",
        f"pass one of the folder names under patches/ (e.g. {option} core_v0.19, or {option} "
        "main / dev for upstream's moving targets)",
    )


# --- writing -------------------------------------------------------------------------------


def json_bytes(obj: object) -> bytes:
    """Deterministic JSON (manifests, state, journals): sorted keys, indent 2, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
