"""``mla-seam apply`` end to end: apply, --check, --status, --revert, idempotency, offsets.

Real git, real upstream trees (fixtures ``megatron_checkout``/``fresh_checkout``), the synthetic
series of ``test_series`` (3 patches, 3 patched files + the overlay), the CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import pytest
from mla_seam.apply import DEFAULT_CHECKOUT, DEFAULT_RELEASE, adapter_summary
from mla_seam.errors import (
    STATUS_EXIT_CODES,
    DriftedTreeError,
    UnsupportedVersionError,
    UpstreamError,
    UsageError,
)
from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.tree import MegatronTree
from support import newest_fast
from support import (
    BASE,
    LM,
    MLA,
    REPO_ROOT,
    SYNTHETIC_ADAPTER,
    SYNTHETIC_CONFIG,
    TC,
    commit,
    insert_lines,
    run_cli,
    set_version,
    snapshot,
    state_dir,
    tree_hash,
)

TREES = [("0.16.1", True), ("0.19.2", True), ("0.16.1", False), ("0.19.2", False)]


def _line(version: str) -> str:
    return "core_v" + ".".join(version.split(".")[:2])


def _status(env: Dict[str, str], tree: Path) -> str:
    return run_cli(env, "--status", str(tree)).stdout.splitlines()[0]


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=tree, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(
    "version, git", TREES, ids=[f"{v}-{'git' if g else 'plain'}" for v, g in TREES]
)
def test_apply_status_revert_roundtrip(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], version: str, git: bool
) -> None:
    tree = make_tree(version, git=git)
    before = snapshot(tree)
    assert _status(seam_env, tree) == "not applied"
    check = run_cli(seam_env, "--check", str(tree))
    assert check.returncode == 0, check.stderr
    assert "applies exactly" in check.stdout and "check passed" in check.stdout
    assert snapshot(tree) == before and not state_dir(tree).exists(), "--check wrote something"

    done = run_cli(seam_env, str(tree))
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert last == f"mla-seam: applied {_line(version)} (3 patches, 4 files) to {tree}"
    assert (tree / ADAPTER_RELPATH).read_bytes() == SYNTHETIC_ADAPTER
    for rel, tag in ((MLA, b"hook H1"), (MLA, b"hook H2"), (TC, b"hook H2"), (LM, b"hook H3")):
        assert tag in (tree / rel).read_bytes()
    applied = snapshot(tree)
    assert applied[1] == before[1], "apply must not commit or stage (HEAD and index unchanged)"
    if git:
        assert sorted(_git(tree, "status", "--porcelain").splitlines()) == sorted(
            [f" M {LM}", f" M {MLA}", f" M {TC}", f"?? {ADAPTER_RELPATH}"]
        )
    assert _status(seam_env, tree) == "applied"

    again = run_cli(seam_env, str(tree))
    assert again.returncode == 0 and "already applied" in again.stdout
    assert snapshot(tree) == applied
    check = run_cli(seam_env, "--check", str(tree))
    assert check.returncode == 0 and "already applied" in check.stdout

    undo = run_cli(seam_env, "--revert", str(tree))
    assert undo.returncode == 0, undo.stderr
    assert undo.stdout.splitlines()[-1].startswith(f"mla-seam: reverted {_line(version)}")
    assert snapshot(tree) == before, "revert is not byte-exact"
    assert not state_dir(tree).exists(), "revert left mla-seam state behind"
    assert _status(seam_env, tree) == "not applied"
    again = run_cli(seam_env, "--revert", str(tree))
    assert again.returncode == 0 and "nothing to revert" in again.stdout


def test_apply_and_revert_keep_file_modes(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.1", git=False)
    (tree / TC).chmod(0o755)
    (tree / LM).chmod(0o600)
    before = snapshot(tree)
    assert run_cli(seam_env, str(tree)).returncode == 0
    assert (tree / TC).stat().st_mode & 0o7777 == 0o755
    assert (tree / LM).stat().st_mode & 0o7777 == 0o600
    assert (tree / ADAPTER_RELPATH).stat().st_mode & 0o7777 == 0o644
    assert run_cli(seam_env, "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def test_offsets_are_reported_when_a_file_moved(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.16.0")  # the synthetic 0.16.0: MLA moved down by three lines
    before = snapshot(tree)
    check = run_cli(seam_env, "--check", str(tree))
    assert check.returncode == 0 and "applies with offsets" in check.stdout
    done = run_cli(seam_env, str(tree))
    assert done.returncode == 0, done.stderr
    offsets = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("offset:")]
    assert len(offsets) == 2 and all(MLA in ln and "(+3)" in ln for ln in offsets)
    assert "2 hunk(s) applied at an offset" in done.stdout
    assert _status(seam_env, tree) == "applied"
    assert run_cli(seam_env, "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def test_check_on_a_fork_simulates_and_reports_offsets(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    """A committed change far from every hunk: a fork, which the patches take strictly."""
    tree = make_tree("0.16.1")
    insert_lines(tree, [(MLA, 1, "# upstream moved this file by two lines"), (MLA, 1, "#")])
    commit(tree, "upstream change")
    before = snapshot(tree)
    check = run_cli(seam_env, "--check", str(tree))
    assert check.returncode == 0, check.stderr
    assert f"{MLA}: moved" in check.stdout and "a fork" in check.stdout
    assert "applies with offsets" in check.stdout and "would apply" in check.stdout
    status = run_cli(seam_env, "--status", str(tree))
    assert status.returncode == STATUS_EXIT_CODES["not applied"]
    assert status.stdout.splitlines()[0] == "not applied"
    assert snapshot(tree) == before


def test_status_partial_and_drifted(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.19.2")
    assert run_cli(seam_env, str(tree)).returncode == 0
    _git(tree, "checkout", "--", TC)  # the user restores one patched file
    status = run_cli(seam_env, "--status", str(tree))
    assert status.returncode == STATUS_EXIT_CODES["partial"]
    assert status.stdout.splitlines()[0] == "partial" and f"{TC}: pristine" in status.stdout
    refused = run_cli(seam_env, str(tree))
    assert refused.returncode == DriftedTreeError.exit_code and "half applied" in refused.stderr

    insert_lines(tree, [(LM, 5, "# user edit")])
    status = run_cli(seam_env, "--status", str(tree))
    assert status.returncode == STATUS_EXIT_CODES["drifted"] == DriftedTreeError.exit_code
    assert status.stdout.splitlines()[0] == "drifted" and f"{LM}: moved" in status.stdout
    assert "changed after apply" in status.stdout


def test_overlay_only_missing_is_completed(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    tree = make_tree("0.19.2", git=False)
    assert run_cli(seam_env, str(tree)).returncode == 0
    applied = tree_hash(tree)
    (tree / ADAPTER_RELPATH).unlink()
    assert _status(seam_env, tree) == "partial"
    done = run_cli(seam_env, str(tree))
    assert done.returncode == 0 and "1 file(s) written" in done.stdout
    assert tree_hash(tree) == applied


def test_forced_series_on_a_newer_version(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    """main's 0.20.0 whose files match no series: refused in one line that names --series."""
    tree = make_tree("0.19.2")
    set_version(tree, "0.20.0")
    insert_lines(tree, [(LM, 1, "# main moved on")])
    commit(tree, "main moved on")
    before = snapshot(tree)
    refused = run_cli(seam_env, str(tree))
    assert refused.returncode == UnsupportedVersionError.exit_code
    assert refused.stderr.strip().splitlines() == [
        "mla-seam apply: megatron-core 0.20.0 is newer than every series (newest: core_v0.19); "
        "to try that one, pass --series core_v0.19"
    ]
    assert snapshot(tree) == before
    done = run_cli(seam_env, "--series", "core_v0.19", str(tree))
    assert done.returncode == 0, done.stderr
    assert _status(seam_env, tree) == "applied on a fork (1 offset)"  # no --series: the record
    assert run_cli(seam_env, "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def test_site_packages_layout_and_package_folder_argument(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_tree("0.16.1", git=False)
    site = tmp_path / "venv" / "lib" / "site-packages"
    shutil.copytree(source / "megatron", site / "megatron")
    before = tree_hash(site)
    done = run_cli(seam_env, str(site / "megatron"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith(f"to {site}")
    assert (site / ".mla-seam" / "state.json").is_file()
    assert _status(seam_env, site / "megatron" / "core") == "applied"
    assert run_cli(seam_env, "--revert", str(site)).returncode == 0
    assert tree_hash(site) == before and not (site / ".mla-seam").exists()


def test_tree_resolution_reads_version_without_importing(
    make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    tree = make_tree("0.19.2")
    (tree / "megatron/core/package_info.py").write_text(
        (tree / "megatron/core/package_info.py").read_text() + "\nraise SystemExit('imported!')\n"
    )
    found = MegatronTree.resolve(tree / "megatron")
    assert found.root == tree and found.version == "0.19.2" and found.is_git
    assert found.state_dir == tree / ".git" / "mla-seam"


def test_default_job_reuses_megatron_lm(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    work = tmp_path / "job"
    work.mkdir()
    make_tree(DEFAULT_RELEASE, name=f"job/{DEFAULT_CHECKOUT}")
    no_torch = {"MLA_SEAM_PYTHON": "false"}  # summary's failure path; success: real test below
    done = run_cli(seam_env, cwd=work, extra=no_torch)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    tree = work / DEFAULT_CHECKOUT
    assert lines[-2] == f"mla-seam: applied {_line(DEFAULT_RELEASE)} (3 patches, 4 files) to {tree}"
    assert lines[-1].startswith("adapter summary unavailable (false): exit 1 (set MLA_SEAM_PYTHON")
    again = run_cli(seam_env, cwd=work, extra=no_torch)
    assert again.returncode == 0 and "already applied" in again.stdout
    assert run_cli(seam_env, "--status", cwd=work).stdout.startswith("applied")


def test_default_job_materializes_the_default_release(
    seam_env: Dict[str, str], tmp_path: Path
) -> None:
    done = run_cli(seam_env, cwd=tmp_path, extra={"MLA_SEAM_PYTHON": "false"})  # no torch import
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"release {DEFAULT_RELEASE} not cached and the registry is unreachable")
    assert done.returncode == 0, done.stderr
    tree = MegatronTree.resolve(tmp_path / DEFAULT_CHECKOUT)
    assert tree.version == DEFAULT_RELEASE and tree.is_git
    assert (tree.root / ADAPTER_RELPATH).read_bytes() == SYNTHETIC_ADAPTER


def test_default_job_refuses_another_release(
    seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "job").mkdir()
    tree = make_tree("0.16.1", name=f"job/{DEFAULT_CHECKOUT}")
    before = snapshot(tree)
    done = run_cli(seam_env, cwd=tmp_path / "job")
    assert done.returncode == UsageError.exit_code and "not the default" in done.stderr
    assert snapshot(tree) == before


def test_adapter_summary_reports_import_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLA_SEAM_PYTHON", sys.executable)
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    for rel in ("megatron/__init__.py", "megatron/core/__init__.py"):
        (tmp_path / rel).write_text("")
    text = adapter_summary(tmp_path)
    assert text.startswith("adapter summary unavailable") and "ModuleNotFoundError" in text
    adapter = tmp_path / ADAPTER_RELPATH
    adapter.parent.mkdir(parents=True)
    (adapter.parent / "__init__.py").write_text("")
    adapter.write_bytes(SYNTHETIC_ADAPTER)
    (adapter.parent / "transformer_config.py").write_bytes(SYNTHETIC_CONFIG)
    assert adapter_summary(tmp_path) == "synthetic adapter: describe ok (128, local)"


def test_apply_sh_is_posix_and_delegates(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    script = REPO_ROOT / "scripts" / "apply.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    if not (REPO_ROOT / ".venv" / "bin" / "mla-seam").exists():
        pytest.skip("no .venv in the repository (scripts/apply.sh would create it: slow)")
    tree = make_tree("0.16.1", git=False)
    done = subprocess.run(
        ["sh", str(script), "--status", str(tree)], env=seam_env, capture_output=True, text=True
    )
    assert done.returncode == STATUS_EXIT_CODES["not applied"], done.stderr
    assert done.stdout.startswith("not applied")


REAL_LINES = {
    p.parent.name: p.parent for p in sorted((REPO_ROOT / "patches").glob("core_v*/manifest.json"))
}


@pytest.mark.skipif(not REAL_LINES, reason="the real series (patches/core_v*) are not written yet")
@pytest.mark.parametrize("version", sorted(BASE.values()))
def test_real_series_roundtrip(
    version: str, make_tree: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    if _line(version) not in REAL_LINES:
        pytest.skip(f"no real series for {version} yet")
    env = _real_env(monkeypatch)
    tree = make_tree(version)
    before = snapshot(tree)
    done = run_cli(env, str(tree))
    assert done.returncode == 0, done.stderr
    assert (tree / ADAPTER_RELPATH).read_bytes() == (
        REPO_ROOT / "overlay" / ADAPTER_RELPATH
    ).read_bytes()
    assert _status(env, tree) == "applied"
    assert run_cli(env, "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def _real_env(monkeypatch: pytest.MonkeyPatch) -> Dict[str, str]:
    """Environment using the repository's own patches/ and overlay/."""
    monkeypatch.delenv("MLA_SEAM_ROOT", raising=False)
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT / "scripts")}


@pytest.mark.skipif(
    f"core_v{DEFAULT_RELEASE.rsplit('.', 1)[0]}" not in REAL_LINES,
    reason="no real series for the default release yet",
)
def test_real_default_job_prints_the_adapter_summary(
    make_tree: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main job as a user runs it: real series, real adapter, summary from a real import."""
    env = {**_real_env(monkeypatch), "MLA_SEAM_PYTHON": sys.executable}
    (tmp_path / "job").mkdir()
    make_tree(DEFAULT_RELEASE, name=f"job/{DEFAULT_CHECKOUT}")
    done = run_cli(env, cwd=tmp_path / "job")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2].startswith(f"mla-seam: applied {_line(DEFAULT_RELEASE)} (")
    assert lines[-1].strip(), "the adapter summary line is empty"


REAL_RELEASES = [
    (line, release)
    for line, folder in REAL_LINES.items()
    for release in json.loads((folder / "manifest.json").read_text())["releases"]
]


@pytest.mark.skipif(not REAL_RELEASES, reason="the real series are not written yet")
@pytest.mark.parametrize(
    "line, release", newest_fast(REAL_RELEASES, version=lambda row: row[1], ids=lambda row: row[1])
)
def test_real_series_checks_on_every_listed_release(
    line: str,
    release: str,
    megatron_checkout: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every release a manifest lists passes --check; --check writes nothing (cache stays clean)."""
    try:
        tree = megatron_checkout(release)
    except UpstreamError as exc:
        pytest.skip(f"{release} not cached and not downloadable: {exc.message}")
    before = snapshot(tree)
    done = run_cli(_real_env(monkeypatch), "--check", str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"check passed: {line}" in done.stdout
    assert snapshot(tree) == before and not state_dir(tree).exists()
