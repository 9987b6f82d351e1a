"""A table of bad inputs to ``mla-seam apply`` on full release checkouts (the synthetic bundle):
each gives its exit code, says what is wrong, and loses nothing (the tree's files, HEAD, the
index and the user's uncommitted work are unchanged). ``test_integrity.py`` has the larger sweep
on small trees with the real bundle.

A few rows are inputs that look odd but must WORK (a path with spaces, the ``megatron`` package
folder as argument, an interrupted earlier run that the next run repairs).

Runs are forked children of this process (:func:`integrity.run`: the CLI's main, no interpreter
start), except where a row wraps the command (a read-only mount namespace).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import integrity
import pytest
from mla_seam import errors
from mla_seam.paths import ADAPTER_RELPATH
from support import (
    LM,
    MLA,
    TC,
    commit,
    insert_lines,
    run_cli,
    set_version,
    snapshot,
    state_dir,
)


@dataclasses.dataclass
class Ctx:
    """What a row's setup works with; setup returns the CLI arguments."""

    tree: Path
    env: Dict[str, str]
    tmp: Path
    bundle: Path
    make_tree: Callable[..., Path]
    cwd: Optional[Path] = None
    wrapper: List[str] = dataclasses.field(default_factory=list)
    cleanups: List[Callable[[], None]] = dataclasses.field(default_factory=list)

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        done = integrity.run(["apply", *args], {**self.env, **extra}, self.cwd)
        code = done.code if done.code is not None else -(done.signal or 0)
        return subprocess.CompletedProcess(args, code, done.out, done.err)

    def own_bundle(self) -> Path:
        """A private copy of the synthetic bundle, made the one the CLI uses."""
        copy = Path(shutil.copytree(self.bundle, self.tmp / "bundle"))
        self.env["MLA_SEAM_ROOT"] = str(copy)
        return copy

    def line16(self) -> Path:
        return self.own_bundle() / "patches" / "core_v0.16"


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    setup: Callable[[Ctx], List[str]]
    code: int
    message: str
    git: bool = True
    works: bool = False  # a valid input: the tree is expected to end applied


def assert_nothing_lost(ctx: Ctx, before: tuple, txn_before: bool = False) -> None:
    """The tree's files (bytes and modes), HEAD and index are as before; no transaction was
    left behind (one that was there before and could not be repaired stays, with its backups)."""
    assert snapshot(ctx.tree) == before, "the run changed the tree, HEAD or the index"
    folder = state_dir(ctx.tree)
    assert (folder / "txn").exists() == txn_before, "a transaction folder appeared or vanished"
    assert not list(folder.glob("scratch-*")), "a scratch folder was left behind"


# --- setups --------------------------------------------------------------------------------


def _tree(ctx: Ctx) -> List[str]:
    return [str(ctx.tree)]


def _forge(ctx: Ctx, old: bytes, new: bytes) -> List[str]:
    """Rewrite patch 0001 and fix its sha256, so only the paths inside are bad."""
    line = ctx.line16()
    manifest = json.loads((line / "manifest.json").read_text())
    entry = manifest["patches"][0]
    data = (line / entry["name"]).read_bytes().replace(old, new)
    (line / entry["name"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (line / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return _tree(ctx)


def _edit_manifest(ctx: Ctx, edit: Callable[[dict], None]) -> List[str]:
    line = ctx.line16()
    manifest = json.loads((line / "manifest.json").read_text())
    edit(manifest)
    (line / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return _tree(ctx)


def _git(ctx: Ctx, *args: str) -> None:
    subprocess.run(["git", *args], cwd=ctx.tree, check=True, capture_output=True)


def _apply_first(ctx: Ctx) -> None:
    done = ctx.cli(str(ctx.tree))
    assert done.returncode == 0, done.stderr


def _file_arg(ctx: Ctx) -> List[str]:
    (ctx.tmp / "file.txt").write_text("not a tree\n")
    return [str(ctx.tmp / "file.txt")]


def _empty_dir(ctx: Ctx) -> List[str]:
    (ctx.tmp / "empty").mkdir()
    return [str(ctx.tmp / "empty")]


def _remove_package_info(ctx: Ctx) -> List[str]:
    (ctx.tree / "megatron/core/package_info.py").unlink()
    return _tree(ctx)


def _garbage_package_info(ctx: Ctx) -> List[str]:
    (ctx.tree / "megatron/core/package_info.py").write_text("MAJOR = (\n")
    return _tree(ctx)


def _version(version: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        set_version(ctx.tree, version)
        commit(ctx.tree, f"pretend {version}")
        return _tree(ctx)

    return setup


def _prerelease(ctx: Ctx) -> List[str]:
    info = ctx.tree / "megatron/core/package_info.py"
    info.write_text(info.read_text().replace('PRE_RELEASE = ""', 'PRE_RELEASE = "rc0"'))
    commit(ctx.tree, "a pre-release")
    return _tree(ctx)


def _dirty_edit(ctx: Ctx) -> List[str]:
    insert_lines(ctx.tree, [(MLA, 10, "# my uncommitted work")])
    return _tree(ctx)


def _staged_edit(ctx: Ctx) -> List[str]:
    insert_lines(ctx.tree, [(TC, 10, "# my staged work")])
    _git(ctx, "add", TC)
    return _tree(ctx)


def _foreign_overlay(committed: bool) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        (ctx.tree / ADAPTER_RELPATH).write_text("# someone else's mla_adapter.py\n")
        if committed:
            commit(ctx.tree, "upstream adds mla_adapter.py")
        return _tree(ctx)

    return setup


def _overlay_folder(ctx: Ctx) -> List[str]:
    (ctx.tree / ADAPTER_RELPATH).mkdir()
    (ctx.tree / ADAPTER_RELPATH / "keep.txt").write_text("mine\n")
    return _tree(ctx)


def _corrupt_patch(ctx: Ctx) -> List[str]:
    patch = sorted(ctx.line16().glob("0002-*.patch"))[0]
    patch.write_bytes(patch.read_bytes().replace(b"hook H2", b"hook H9"))
    return _tree(ctx)


def _missing_patch(ctx: Ctx) -> List[str]:
    sorted(ctx.line16().glob("0003-*.patch"))[0].unlink()
    return _tree(ctx)


def _empty_line(ctx: Ctx) -> Path:
    line = ctx.line16()
    shutil.rmtree(line)
    line.mkdir()
    return line


def _manifest_not_json(ctx: Ctx) -> List[str]:
    (ctx.line16() / "manifest.json").write_text("{")
    return _tree(ctx)


def _empty_line_forced(ctx: Ctx) -> List[str]:
    _empty_line(ctx)
    return ["--series", "core_v0.16", str(ctx.tree)]


def _empty_line_auto(ctx: Ctx) -> List[str]:
    _empty_line(ctx)
    return _tree(ctx)


def _check_moved(ctx: Ctx) -> List[str]:
    return ["--check", *_moved_upstream(ctx)]


def _overlay_source_edited(ctx: Ctx) -> List[str]:
    adapter = ctx.own_bundle() / "overlay" / ADAPTER_RELPATH
    adapter.write_bytes(adapter.read_bytes() + b"# edited without re-exporting\n")
    return _tree(ctx)


def _no_bundle(ctx: Ctx) -> List[str]:
    (ctx.tmp / "nothing").mkdir()
    ctx.env["MLA_SEAM_ROOT"] = str(ctx.tmp / "nothing")
    return _tree(ctx)


_RO_BIND = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'


def _can_bind_read_only(tmp: Path) -> bool:
    probe = tmp / "ro-probe"
    probe.mkdir(exist_ok=True)
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            _RO_BIND,
            "sh",
            str(probe),
            "sh",
            "-c",
            "! touch \"$0/x\"",
            str(probe),
        ],
        capture_output=True,
    )
    return done.returncode == 0


def _read_only(part: str) -> Callable[[Ctx], List[str]]:
    """Make ``tree/part`` read-only for the CLI: chmod for a normal user; for root (whom chmod
    does not stop) a read-only bind mount in a private mount namespace, else skip."""

    def setup(ctx: Ctx) -> List[str]:
        target = ctx.tree / part if part else ctx.tree
        if os.geteuid() != 0:
            folders = [
                p for p in [target, *target.rglob("*")] if p.is_dir() and ".git" not in p.parts
            ]
            folders += [ctx.tree / ".git"] if not part else []  # no state folder either
            modes = {p: p.stat().st_mode for p in folders}
            for p in folders:
                p.chmod(modes[p] & ~0o222)
            ctx.cleanups.append(lambda: [p.chmod(m) for p, m in modes.items()])
        elif _can_bind_read_only(ctx.tmp):
            ctx.wrapper = ["unshare", "-m", "sh", "-c", _RO_BIND, "sh", str(target)]
        else:
            pytest.skip(
                "running as root without mount namespaces: chmod cannot make a tree read-only"
            )
        return _tree(ctx)

    return setup


def _hold_lock(ctx: Ctx) -> List[str]:
    folder = state_dir(ctx.tree)
    folder.mkdir(parents=True)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())

    def release() -> None:
        os.close(fd)
        shutil.rmtree(folder)

    ctx.cleanups.append(release)
    return _tree(ctx)


def _spaces(ctx: Ctx) -> List[str]:
    ctx.tree = ctx.make_tree("0.16.1", name="dir with spaces/mega tron")
    return _tree(ctx)


def _symlink(rel: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        outside = ctx.tmp / "elsewhere" / Path(rel).name
        outside.parent.mkdir()
        shutil.move(str(ctx.tree / rel), outside)
        (ctx.tree / rel).symlink_to(outside)
        return _tree(ctx)

    return setup


def _interrupted(ctx: Ctx) -> List[str]:
    killed = ctx.cli(str(ctx.tree), MLA_SEAM_CRASH_AT="replaced:2")
    assert killed.returncode == -9
    assert (state_dir(ctx.tree) / "txn" / "journal.json").exists()
    return _tree(ctx)


def _moved_upstream(ctx: Ctx) -> List[str]:
    insert_lines(ctx.tree, [(MLA, 40, "# upstream rewrote this part")])
    commit(ctx.tree, "upstream moves MLA")
    return _tree(ctx)


def _edited_after_apply(rel: str, mode: str = "--revert") -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        _apply_first(ctx)
        with open(ctx.tree / rel, "a") as handle:
            handle.write("# my edit after apply\n")
        return [mode, str(ctx.tree)]

    return setup


def _half_applied(ctx: Ctx) -> List[str]:
    _apply_first(ctx)
    _git(ctx, "checkout", "--", TC)
    return _tree(ctx)


def _corrupt_state(ctx: Ctx) -> List[str]:
    _apply_first(ctx)
    (state_dir(ctx.tree) / "state.json").write_text("{not json")
    return ["--status", str(ctx.tree)]


def _corrupt_journal(ctx: Ctx) -> List[str]:
    txn = state_dir(ctx.tree) / "txn"
    txn.mkdir(parents=True)
    (txn / "journal.json").write_text("{")
    return _tree(ctx)


def _plain_edit(ctx: Ctx) -> List[str]:
    insert_lines(ctx.tree, [(MLA, 10, "# local edit in site-packages")])
    return _tree(ctx)


def _plain_delete(ctx: Ctx) -> List[str]:
    (ctx.tree / LM).unlink()
    return _tree(ctx)


def _no_default_checkout(ctx: Ctx) -> List[str]:
    ctx.cwd = ctx.tmp / "cwd"
    ctx.cwd.mkdir()
    return ["--status"]


def _fork_version(ctx: Ctx) -> List[str]:
    """0.17.1 by version, and a file that matches no series: the 0.17 line does not exist."""
    set_version(ctx.tree, "0.17.1")
    insert_lines(ctx.tree, [(LM, 1, "# a fork of 0.17.1")])
    commit(ctx.tree, "pretend a 0.17.1 fork")
    return _tree(ctx)


def _broken_git_file(ctx: Ctx) -> List[str]:
    shutil.rmtree(ctx.tree / ".git")
    (ctx.tree / ".git").write_text("gitdir: /nonexistent/worktrees/megatron\n")
    return _tree(ctx)


def _state_folder_is_a_file(ctx: Ctx) -> List[str]:
    (ctx.tree / ".git" / "mla-seam").write_text("not a folder\n")
    return _tree(ctx)


def _env(**extra: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        ctx.env.update(extra)
        return _tree(ctx)

    return setup


def _literal_home(ctx: Ctx) -> List[str]:
    ctx.tree = ctx.make_tree("0.16.1", name="$HOME/megatron-lm")
    return _tree(ctx)


def _near_path_max(ctx: Ctx) -> List[str]:
    """A tree whose path is close to PATH_MAX (4096): 200-character folder names."""
    base = ctx.tmp
    while len(str(base)) < 3850:
        base = base / ("d" * 200)
    base = base / ("e" * (3950 - len(str(base))))
    base.mkdir(parents=True)
    tree = base / "t"
    shutil.copytree(ctx.tree, tree, symlinks=True)
    ctx.tree = tree
    return _tree(ctx)


def _autocrlf(ctx: Ctx) -> List[str]:
    """A clean checkout made with core.autocrlf=true: every text file has CRLF endings."""
    _git(ctx, "config", "core.autocrlf", "true")
    for rel in (MLA, TC, LM):
        (ctx.tree / rel).unlink()
    _git(ctx, "checkout", "--", MLA, TC, LM)
    assert b"\r\n" in (ctx.tree / MLA).read_bytes()
    return _tree(ctx)


E = errors
ROWS = [
    Row(
        "missing-dir",
        lambda c: [str(c.tmp / "no such tree")],
        E.TreeNotFoundError.exit_code,
        "does not exist",
    ),
    Row("file-instead-of-dir", _file_arg, E.TreeNotFoundError.exit_code, "is not a directory"),
    Row("not-megatron", _empty_dir, E.NotMegatronTreeError.exit_code, "holds no megatron/core"),
    Row(
        "no-package-info",
        _remove_package_info,
        E.NotMegatronTreeError.exit_code,
        "package_info.py is missing",
    ),
    Row(
        "garbage-package-info",
        _garbage_package_info,
        E.NotMegatronTreeError.exit_code,
        "cannot read",
    ),
    Row(
        "unsupported-version",
        _fork_version,
        E.UnsupportedVersionError.exit_code,
        "0.17.1 has no patch series",
    ),
    Row(
        "unknown-series-line",
        lambda c: ["--series", "core_v0.42", str(c.tree)],
        E.UsageError.exit_code,
        "no such release line",
    ),
    Row("conflicting-modes", lambda c: ["--check", "--revert", str(c.tree)], 2, "not allowed with"),
    Row("dirty-overlapping-file", _dirty_edit, E.DirtyTreeError.exit_code, f"patches: {MLA}"),
    Row("staged-change", _staged_edit, E.DirtyTreeError.exit_code, f"patches: {TC}"),
    Row(
        "untracked-foreign-overlay",
        _foreign_overlay(False),
        E.OverlayConflictError.exit_code,
        f"{ADAPTER_RELPATH} already exists",
    ),
    Row(
        "overlay-present-upstream",
        _foreign_overlay(True),
        E.OverlayConflictError.exit_code,
        "not mla-seam's adapter",
    ),
    Row(
        "overlay-path-is-folder",
        _overlay_folder,
        E.OverlayConflictError.exit_code,
        "move it out of the way",
    ),
    Row("corrupted-patch", _corrupt_patch, E.SeriesCorruptError.exit_code, "sha256"),
    Row(
        "patch-escapes-tree",
        lambda c: _forge(c, b"a/" + MLA.encode(), b"a/../../" + MLA.encode()),
        E.UnsafePathError.exit_code,
        "escapes the tree",
    ),
    Row(
        "absolute-path-in-patch",
        lambda c: _forge(c, b"a/" + MLA.encode(), b"a//tmp/" + MLA.encode()),
        E.UnsafePathError.exit_code,
        "absolute path",
    ),
    Row(
        "patch-into-dot-git",
        lambda c: _forge(c, MLA.encode(), b".git/config"),
        E.UnsafePathError.exit_code,
        "points into .git",
    ),
    Row(
        "manifest-missing-patch",
        _missing_patch,
        E.SeriesCorruptError.exit_code,
        "listed in the manifest but missing",
    ),
    Row(
        "manifest-schema-unknown",
        lambda c: _edit_manifest(c, lambda m: m.update(schema=7)),
        E.SeriesCorruptError.exit_code,
        "schema 7",
    ),
    Row(
        "manifest-not-json",
        _manifest_not_json,
        E.SeriesCorruptError.exit_code,
        "manifest.json is not valid JSON",
    ),
    Row(
        "empty-series-folder-forced",
        _empty_line_forced,
        E.SeriesCorruptError.exit_code,
        "manifest.json is missing",
    ),
    Row(
        "empty-series-folder",
        _empty_line_auto,
        E.SeriesCorruptError.exit_code,
        "manifest.json is missing",
    ),
    Row(
        "overlay-source-edited",
        _overlay_source_edited,
        E.BundleError.exit_code,
        "does not match the blob in the manifests",
    ),
    Row("no-bundle", _no_bundle, E.BundleError.exit_code, "no patches/ and overlay/"),
    Row(
        "read-only-files",
        _read_only("megatron"),
        E.ReadOnlyTreeError.exit_code,
        "cannot write megatron/",
    ),
    Row(
        "read-only-tree",
        _read_only(""),
        E.ReadOnlyTreeError.exit_code,
        "cannot write mla-seam's state folder",
    ),
    Row("concurrent-apply", _hold_lock, E.LockedError.exit_code, f"(pid {os.getpid()})"),
    Row(
        "symlinked-target-file",
        _symlink(TC),
        E.UnsafePathError.exit_code,
        f"symbolic link on the path of {TC}",
    ),
    Row(
        "symlinked-folder",
        _symlink(str(Path(LM).parent)),
        E.UnsafePathError.exit_code,
        "symbolic link",
    ),
    Row(
        "fork-changed-a-hunk-context",
        _moved_upstream,
        E.PreimageMismatchError.exit_code,
        f"{MLA}: 0001-mla-seam-H1-core-attention-hook.patch hunk #1",
    ),
    Row(
        "fork-changed-a-hunk-context-names-the-commit",
        _moved_upstream,
        E.PreimageMismatchError.exit_code,
        "line 41 of the fork, changed by ",
    ),
    Row(
        "check-fork-changed-a-hunk-context",
        _check_moved,
        E.PreimageMismatchError.exit_code,
        f"{MLA}: moved",
    ),
    Row(
        "plain-tree-deleted-file",
        _plain_delete,
        E.PreimageMismatchError.exit_code,
        f"{LM} (missing",
        git=False,
    ),
    Row("revert-never-applied", lambda c: ["--revert", str(c.tree)], 0, "nothing to revert"),
    Row(
        "revert-after-user-edit",
        _edited_after_apply(MLA),
        E.DriftedTreeError.exit_code,
        f"edited after apply (neither the patched nor the pristine content): {MLA}",
    ),
    Row(
        "revert-after-adapter-edit",
        _edited_after_apply(ADAPTER_RELPATH),
        E.DriftedTreeError.exit_code,
        f"{ADAPTER_RELPATH}; reverting would lose",
    ),
    Row(
        "status-after-user-edit-plain",
        _edited_after_apply(LM, "--status"),
        E.DriftedTreeError.exit_code,
        "drifted",
        git=False,
    ),
    Row("half-applied", _half_applied, E.DriftedTreeError.exit_code, "half applied"),
    Row(
        "state-json-corrupted",
        _corrupt_state,
        E.StateCorruptError.exit_code,
        "state record damaged",
    ),
    Row("empty-path-argument", lambda c: [""], E.UsageError.exit_code, "MEGATRON_DIR is empty"),
    Row("blank-path-argument", lambda c: ["  "], E.UsageError.exit_code, "MEGATRON_DIR is empty"),
    Row(
        "dot-git-file-to-missing-gitdir",
        _broken_git_file,
        E.GitError.exit_code,
        "has a .git file saying 'gitdir: /nonexistent/worktrees/megatron'",
    ),
    Row(
        "state-folder-is-a-file",
        _state_folder_is_a_file,
        E.StateCorruptError.exit_code,
        "is not a folder",
    ),
    Row(
        "disk-full-inside-the-transaction",
        _env(MLA_SEAM_CRASH_AT="replaced:2", MLA_SEAM_CRASH_SIGNAL="ENOSPC"),
        E.SystemFailureError.exit_code,
        "No space left on device",
    ),
    Row(
        "disk-full-rolls-back-in-process",
        _env(MLA_SEAM_CRASH_AT="replaced:4", MLA_SEAM_CRASH_SIGNAL="ENOSPC"),
        E.SystemFailureError.exit_code,
        "rolled back an interrupted apply",
    ),
    Row(
        "ctrl-c-during-start-up",
        _env(MLA_SEAM_CRASH_AT="startup", MLA_SEAM_CRASH_SIGNAL="INT"),
        130,
        "interrupted",
    ),
    Row("path-near-path-max", _near_path_max, 0, "applied core_v0.16", works=True),
    Row("journal-corrupted", _corrupt_journal, E.StateCorruptError.exit_code, "is unreadable"),
    Row(
        "status-without-dir",
        _no_default_checkout,
        E.UsageError.exit_code,
        "./megatron-lm does not exist",
    ),
    # Valid inputs that must work:
    Row("path-with-spaces", _spaces, 0, "mla-seam: applied core_v0.16", works=True),
    Row("prerelease-version-string", _prerelease, 0, "applied core_v0.16", works=True),
    Row(
        "version-string-of-another-line",
        _version("0.17.1"),
        0,
        "applied core_v0.16",
        works=True,
    ),
    Row("plain-tree-fork", _plain_edit, 0, "on a fork", git=False, works=True),
    Row("literal-dollar-home-in-path", _literal_home, 0, "applied core_v0.16", works=True),
    Row("autocrlf-true-checkout", _autocrlf, 0, "applied core_v0.16", works=True),
    Row(
        "megatron-package-folder",
        lambda c: [str(c.tree / "megatron")],
        0,
        "applied core_v0.16",
        works=True,
    ),
    Row(
        "interrupted-earlier-apply",
        _interrupted,
        0,
        "repaired: rolled back an interrupted apply",
        works=True,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(
    row: Row,
    seam_env: Dict[str, str],
    bundle: Path,
    make_tree: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ctx = Ctx(make_tree("0.16.1", git=row.git), dict(seam_env), tmp_path, bundle, make_tree)
    try:
        args = row.setup(ctx)
        before = snapshot(ctx.tree)
        txn_before = (state_dir(ctx.tree) / "txn").exists()
        if ctx.wrapper:
            argv = [*ctx.wrapper, sys.executable, "-m", "mla_seam", "apply", *args]
            done = subprocess.run(argv, env=ctx.env, capture_output=True, text=True, timeout=120)
        else:
            done = ctx.cli(*args)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    output = done.stdout + done.stderr
    assert done.returncode == row.code, output
    assert row.message in output, output
    assert "Traceback" not in output, output
    if not row.works:
        assert_nothing_lost(ctx, before, txn_before)
        return
    assert before[1] == snapshot(ctx.tree)[1], "HEAD or the index changed"
    assert ctx.cli("--status", str(ctx.tree)).stdout.startswith("applied")
    assert not (state_dir(ctx.tree) / "txn").exists()


def test_every_error_says_what_to_do(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    """A refused run prints the problem and a hint (``-> ...``) on stderr, nothing on stdout."""
    tree = make_tree("0.16.1")
    insert_lines(tree, [(MLA, 10, "# my uncommitted work")])
    done = run_cli(seam_env, str(tree))
    lines = done.stderr.strip().splitlines()
    assert done.stdout == "" and lines[0].startswith("mla-seam apply: ")
    assert lines[-1].strip().startswith("-> ")
