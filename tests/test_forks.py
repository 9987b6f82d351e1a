"""Forks with their own commits on every hooked file, with the REAL series of the 0.19 line.

Each case is a release checkout (0.19.2, from the PyPI sdist) plus one user commit, applied
in working-tree mode and in commit mode, then reverted: the fork's bytes must come back
exactly, HEAD and the index untouched in working-tree mode, and in commit mode one commit per
patch (with its DEP-3 header) plus the adapter's, undone by revert commits.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import integrity
import pytest
import support
from mla_seam import upstream
from mla_seam.errors import (
    STATUS_EXIT_CODES,
    PreimageMismatchError,
    PreimageUnavailableError,
    UpstreamError,
)
from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.series import load_series
from support import LM, MLA, REPO_ROOT, TC, commit, snapshot, tree_hash

RELEASE = "0.19.2"
LINE = "core_v0.19"


def _cli(
    *args: str, extra: Optional[Dict[str, Optional[str]]] = None
) -> subprocess.CompletedProcess:
    """``mla-seam apply ARGS`` as a forked child of this process (integrity.run: the CLI's main,
    without an interpreter start); the environment of a user: no MLA_SEAM_ROOT, own identity
    (``extra``: more variables, ``None`` unsets one)."""
    env: Dict[str, Optional[str]] = {
        "MLA_SEAM_ROOT": None,
        "MLA_SEAM_CRASH_AT": None,
        "GIT_COMMITTER_NAME": "Fork Owner",
        "GIT_COMMITTER_EMAIL": "owner@fork.example",
        **(extra or {}),
    }
    done = integrity.run(["apply", *args], env)
    assert not done.traceback, done.err
    code = done.code if done.code is not None else -(done.signal or 0)
    return subprocess.CompletedProcess(args, code, done.out, done.err)


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=tree, capture_output=True, text=True, check=True
    ).stdout


def _line_of(tree: Path, rel: str, needle: str) -> int:
    for number, line in enumerate((tree / rel).read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {rel}")


def _insert(tree: Path, rel: str, after: int, text: str) -> None:
    lines = (tree / rel).read_bytes().split(b"\n")
    lines.insert(after, text.encode())
    (tree / rel).write_bytes(b"\n".join(lines))


def _append(tree: Path, rel: str, text: str) -> None:
    with open(tree / rel, "a", encoding="utf-8") as handle:
        handle.write(text)


def far_from_hunks(tree: Path) -> None:
    _append(tree, MLA, "\n\ndef fork_helper():\n    return 1\n")


def next_to_a_hunk(tree: Path) -> None:
    h1 = _line_of(tree, MLA, "submodules.core_attention,")
    _insert(tree, MLA, h1 - 8, "        # fork: a note seven lines above the H1 hunk")


def shifting_every_hunk(tree: Path) -> None:
    for rel in (MLA, TC, LM):
        _insert(tree, rel, 0, "# fork header line")


def field_above_h4(tree: Path) -> None:
    cls = _line_of(tree, TC, "class MLATransformerConfig(")
    _insert(
        tree, TC, cls - 1, "\n# fork: a module constant above MLATransformerConfig\nFORK_X = 1\n"
    )


def top_of_tc(tree: Path) -> None:
    _insert(tree, TC, 0, "# fork: top of transformer_config.py")


def inside_a_hunk_context(tree: Path) -> None:
    h1 = _line_of(tree, MLA, "submodules.core_attention,")
    lines = (tree / MLA).read_text().splitlines(keepends=True)
    lines[h1 - 2] = lines[h1 - 2].rstrip("\n") + "  # fork edit in the H1 context\n"
    (tree / MLA).write_text("".join(lines))


def append_to_tc(tree: Path) -> None:
    _append(tree, TC, "\n# fork: appended at the end of transformer_config.py\n")


CASES: List[Tuple[str, Callable[[Path], None]]] = [
    ("far-from-the-hunks", far_from_hunks),
    ("next-to-a-hunk", next_to_a_hunk),
    ("shifting-every-hunk", shifting_every_hunk),
    ("field-above-the-H4-hunk", field_above_h4),
    ("line-at-the-top-of-TC", top_of_tc),
    ("appended-to-TC", append_to_tc),  # H4 sits below super().__post_init__(), not at the end
]


@pytest.fixture(scope="module")
def fork_template(fresh_checkout: Callable[[str, Path], Path], seam_base: Path) -> Path:
    path = seam_base / f"fork-template-{RELEASE}"
    if not path.exists():
        fresh_checkout(RELEASE, path)
    return path


def _fork(template: Path, dest: Path, edit: Callable[[Path], None]) -> Path:
    support.copy_tree(template, dest)
    edit(dest)
    commit(dest, f"fork: {edit.__name__.replace('_', ' ')}")
    return dest


def _roundtrip_worktree(tree: Path) -> None:
    before = snapshot(tree)
    done = _cli(str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on a fork: the patches applied strictly" in done.stdout
    status = _cli("--status", str(tree))
    assert status.returncode == 0 and status.stdout.startswith("applied on a fork ("), status.stdout
    assert snapshot(tree)[1] == before[1], "working-tree mode must not commit or stage"
    again = _cli(str(tree))
    assert again.returncode == 0 and "already applied" in again.stdout
    undo = _cli("--revert", str(tree))
    assert undo.returncode == 0, undo.stderr
    assert snapshot(tree) == before, "revert did not restore the fork's bytes exactly"


def _roundtrip_commit(tree: Path) -> None:
    before = tree_hash(tree)
    head = _git(tree, "rev-parse", "HEAD").strip()
    done = _cli("--commit", str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    log = _git(tree, "log", "--format=%s%n%b%x00", f"{head}..HEAD").split("\0")
    subjects = [entry.strip().splitlines()[0] for entry in log if entry.strip()]
    patches = (REPO_ROOT / "patches" / LINE / "series").read_text().split()
    assert len(subjects) == len(patches) + 1, subjects
    assert subjects[0].startswith("mla-seam: add the MLA adapter")
    assert all("mla-seam H" in s for s in subjects[1:]), subjects
    full = _git(tree, "log", "--format=%B", f"{head}..HEAD")
    assert full.count("Last-Update:") == len(patches) and "Bug: https://github.com/" in full
    people = _git(tree, "log", "--format=%an|%cn", f"{head}..HEAD~1").splitlines()
    assert set(people) == {"mla-seam|Fork Owner"}, people  # author from the patch, like git am
    assert _git(tree, "status", "--porcelain") == "", "commit mode leaves a clean tree"
    assert (tree / ADAPTER_RELPATH).is_file()
    assert _cli("--status", str(tree)).stdout.startswith("applied on a fork")
    undo = _cli("--revert", str(tree))
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert _git(tree, "status", "--porcelain") == ""
    assert tree_hash(tree) == before, "revert commits did not restore the fork's bytes"
    reverts = _git(tree, "log", "--format=%s", f"{head}..HEAD").splitlines()
    assert len(reverts) == 2 * len(subjects) and reverts[0].startswith('Revert "')


@pytest.mark.parametrize("name, edit", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["worktree", "commit"])
def test_fork_applies_and_reverts(
    name: str, edit: Callable[[Path], None], mode: str, fork_template: Path, tmp_path: Path
) -> None:
    tree = _fork(fork_template, tmp_path / name, edit)
    (_roundtrip_worktree if mode == "worktree" else _roundtrip_commit)(tree)


@pytest.mark.parametrize("mode", [[], ["--commit"]], ids=["worktree", "commit"])
def test_fork_inside_a_hunk_context_is_refused_with_its_commit(
    mode: List[str], fork_template: Path, tmp_path: Path
) -> None:
    tree = _fork(fork_template, tmp_path / "inside", inside_a_hunk_context)
    before = snapshot(tree)
    subject = _git(tree, "log", "-1", "--format=%h (%s)").strip()
    done = _cli(*mode, str(tree))
    assert done.returncode == PreimageMismatchError.exit_code, done.stdout + done.stderr
    assert f"{MLA}: 0001-" in done.stderr and "hunk #1" in done.stderr
    assert f"changed by {subject}" in done.stderr, done.stderr
    assert "--3way" in done.stderr
    assert snapshot(tree) == before
    status = _cli("--status", str(tree))
    assert status.returncode == STATUS_EXIT_CODES["not applied"]


def test_three_way_merges_or_rolls_back(fork_template: Path, tmp_path: Path) -> None:
    """--3way on a context conflict: a merge with conflicts is refused, tree unchanged; a clean
    merge applies and reverts to the fork's bytes."""
    tree = _fork(fork_template, tmp_path / "inside", inside_a_hunk_context)
    before = snapshot(tree)
    done = _cli("--3way", str(tree))
    if done.returncode == 0:
        assert "merged 3-way" in done.stdout
        assert b"<<<<<<<" not in (tree / MLA).read_bytes()
        assert _cli("--status", str(tree)).stdout.startswith("applied on a fork by 3-way merge")
        assert _cli("--revert", str(tree)).returncode == 0
    else:
        assert done.returncode == PreimageMismatchError.exit_code, done.stderr
        assert "rolled back" in done.stderr and "conflicts" in done.stderr
    assert snapshot(tree) == before
    for path in (tree / "megatron").rglob("*.py"):
        assert b"\n<<<<<<< " not in path.read_bytes(), path


def reword(tree: Path) -> None:
    """The first context line of the H1 hunk edited: strict apply refuses, a merge does not."""
    h1 = _line_of(tree, MLA, "submodules.core_attention,")
    lines = (tree / MLA).read_text().splitlines(keepends=True)
    lines[h1 - 5] = lines[h1 - 5].rstrip("\n") + "  # fork: reworded\n"
    (tree / MLA).write_text("".join(lines))


def test_three_way_resolves_a_changed_context_line(fork_template: Path, tmp_path: Path) -> None:
    """A fork that edited the first context line of the H1 hunk: strict apply refuses, --3way
    merges it cleanly, revert is exact."""
    tree = _fork(fork_template, tmp_path / "reword", reword)
    before = snapshot(tree)
    strict = _cli(str(tree))
    assert strict.returncode == PreimageMismatchError.exit_code, strict.stderr
    assert snapshot(tree) == before
    merged = _cli("--3way", str(tree))
    assert merged.returncode == 0, merged.stderr
    assert "merged 3-way without conflicts" in merged.stdout
    assert b"mla_adapter.core_attention_spec" in (tree / MLA).read_bytes()
    assert _cli("--status", str(tree)).stdout.startswith("applied on a fork by 3-way merge")
    assert _cli("--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def _pick_h3(tree: Path) -> None:
    patch = sorted((REPO_ROOT / "patches" / LINE).glob("0003-*.patch"))[0]
    _git(tree, "apply", str(patch))


@pytest.mark.parametrize(
    "flags", [[], ["--3way"], ["--commit"]], ids=["worktree", "3way", "commit"]
)
def test_a_hook_picked_by_hand_is_left_alone(
    flags: List[str], fork_template: Path, tmp_path: Path
) -> None:
    """The fork committed the series' own H3 hunk itself: apply recognises it per hunk, names the
    fork's commit, leaves it out; revert leaves it in place (the fork's bytes come back)."""
    tree = _fork(fork_template, tmp_path / "picked", _pick_h3)
    picked = _git(tree, "log", "-1", "--format=%h").strip()
    before, head = snapshot(tree), _git(tree, "rev-parse", "HEAD").strip()
    status = _cli("--status", str(tree))
    assert status.stdout.startswith("not applied"), status.stdout
    done = _cli(*flags, str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"already in the fork: 0003-" in done.stdout and f"(commit {picked}" in done.stdout
    assert _cli("--status", str(tree)).stdout.startswith("applied on a fork")
    if flags == ["--commit"]:
        subjects = _git(tree, "log", "--format=%s", f"{head}..HEAD").splitlines()
        assert not any("H3" in s for s in subjects) and len(subjects) == 8, subjects
    undo = _cli("--revert", str(tree))
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert "left alone: already in the fork" in undo.stdout
    if flags == ["--commit"]:
        assert tree_hash(tree) == before[0] and _git(tree, "status", "--porcelain") == ""
    else:
        assert snapshot(tree) == before


def test_commit_mode_three_way_records_the_merge(fork_template: Path, tmp_path: Path) -> None:
    tree = _fork(fork_template, tmp_path / "reword", reword)
    before, head = tree_hash(tree), _git(tree, "rev-parse", "HEAD").strip()
    done = _cli("--commit", "--3way", str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    h1 = _git(tree, "log", "--format=%B", "--grep", "mla-seam H1", f"{head}..HEAD")
    assert "mla-seam: merged 3-way onto the fork's " + MLA in h1, h1
    assert _git(tree, "status", "--porcelain") == ""
    assert _cli("--status", str(tree)).stdout.startswith("applied on a fork by 3-way merge")
    assert _cli("--revert", str(tree)).returncode == 0
    assert tree_hash(tree) == before and _git(tree, "status", "--porcelain") == ""


@pytest.mark.parametrize("history", ["no-release-in-history", "shallow-clone"])
def test_three_way_needs_no_release_blobs_in_the_repository(
    history: str, fork_template: Path, tmp_path: Path
) -> None:
    """--3way needs no release blobs in the fork's history (a repository started from the fork's
    files, a --depth 1 clone of the fork): the merge base comes from mla-seam's cache."""
    fork = _fork(fork_template, tmp_path / "fork", reword)
    tree = tmp_path / "tree"
    if history == "shallow-clone":
        subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{fork}", str(tree)],
                       check=True, capture_output=True)  # fmt: skip
    else:
        shutil.copytree(fork, tree, ignore=shutil.ignore_patterns(".git"))
        _git(tree, "init", "-q")
        commit(tree, "the fork, imported without its history")
    for img in load_series(REPO_ROOT / "patches" / LINE).files[MLA]:
        missing = subprocess.run(["git", "cat-file", "-e", img.pre], cwd=tree, capture_output=True)
        assert missing.returncode != 0, "the repository has the release's blob of MLA"
    before = snapshot(tree)
    done = _cli("--3way", str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged 3-way without conflicts" in done.stdout
    assert b"mla_adapter.core_attention_spec" in (tree / MLA).read_bytes()
    assert _cli("--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def _historyless_fork(fork_template: Path, tmp_path: Path) -> Path:
    """The ``reword`` fork's files in a repository of their own (no release blob in history)."""
    fork = _fork(fork_template, tmp_path / "fork", reword)
    tree = tmp_path / "tree"
    shutil.copytree(fork, tree, ignore=shutil.ignore_patterns(".git"))
    _git(tree, "init", "-q")
    commit(tree, "the fork, imported without its history")
    return tree


def _cache_with(tmp_path: Path, sdist: Optional[bytes]) -> Dict[str, Optional[str]]:
    """A cache folder holding only ``megatron_core-RELEASE.tar.gz`` (or nothing), offline."""
    cache = tmp_path / "cache"
    (cache / "sdists").mkdir(parents=True)
    if sdist is not None:
        (cache / "sdists" / f"megatron_core-{RELEASE}.tar.gz").write_bytes(sdist)
    return {"MLA_SEAM_CACHE": str(cache), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": None}


def _sdist_bytes() -> bytes:
    return upstream.fetch_sdist(RELEASE).read_bytes()  # the session's cache (verified)


def test_three_way_takes_the_release_files_from_the_sdist(
    fork_template: Path, tmp_path: Path
) -> None:
    """Nothing in the repository, no release checkout cached, offline: the cached PyPI sdist
    (sha256-verified) gives the merge base, each file checked against its blob id."""
    tree = _historyless_fork(fork_template, tmp_path)
    extra = _cache_with(tmp_path, _sdist_bytes())
    before = snapshot(tree)
    done = _cli("--3way", str(tree), extra=extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged 3-way without conflicts" in done.stdout
    assert not (tmp_path / "cache" / "checkouts").exists()  # the sdist was read, not unpacked
    assert _cli("--revert", str(tree), extra=extra).returncode == 0
    assert snapshot(tree) == before


def test_three_way_offline_without_the_sdist_says_how_to_get_it(
    fork_template: Path, tmp_path: Path
) -> None:
    tree = _historyless_fork(fork_template, tmp_path)
    before = snapshot(tree)
    for flags in (["--check", "--3way"], ["--3way"], ["--commit", "--3way"]):
        done = _cli(*flags, str(tree), extra=_cache_with(tmp_path / "-".join(flags), None))
        assert done.returncode == PreimageUnavailableError.exit_code, done.stdout + done.stderr
        assert f"mla-seam upstream get {RELEASE}" in done.stderr and "MLA_SEAM_CACHE" in (
            done.stderr
        ), done.stderr
        assert MLA in done.stderr and snapshot(tree) == before


def test_a_tampered_sdist_is_never_read(fork_template: Path, tmp_path: Path) -> None:
    """An sdist in the cache that is not PyPI's bytes is refused (delete it, run again)."""
    tree = _historyless_fork(fork_template, tmp_path)
    data = bytearray(_sdist_bytes())
    data[-100] ^= 0xFF
    before = snapshot(tree)
    done = _cli("--3way", str(tree), extra=_cache_with(tmp_path, bytes(data)))
    assert done.returncode == UpstreamError.exit_code, done.stdout + done.stderr
    assert "has sha256" in done.stderr and "delete" in done.stderr
    assert snapshot(tree) == before


def test_a_hook_file_committed_with_crlf_is_the_release(
    fork_template: Path, tmp_path: Path
) -> None:
    def crlf(tree: Path) -> None:
        (tree / LM).write_bytes((tree / LM).read_bytes().replace(b"\n", b"\r\n"))

    tree = _fork(fork_template, tmp_path / "crlf", crlf)
    before = snapshot(tree)
    check = _cli("--check", str(tree))
    assert (
        check.returncode == 0
        and f"{LM}: pristine (pre-image ok, CRLF line endings)" in check.stdout
    )
    done = _cli(str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    data = (tree / LM).read_bytes()
    assert b"mla_adapter.resolve_attention_backend" in data
    assert data.count(b"\n") == data.count(b"\r\n"), "the file keeps its CRLF endings"
    assert _cli("--status", str(tree)).returncode == 0
    assert _cli("--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before
