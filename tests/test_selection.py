"""Series selection by content, on trees with upstream's own version strings (real series).

Upstream's tags say 0.19.1 at core_v0.19.0, 0.17.0rc0 at core_v0.17.0 and 0.20.0 on main; the
hooked files at those tags are the PyPI releases' bytes. Each tree here is a release built from
its sdist with package_info edited to such a string: apply, status and revert must all work
with no --series, and say which line they chose and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import pytest
from mla_seam.selection import fingerprint
from mla_seam.tree import MegatronTree
from support import LM, REPO_ROOT, commit, insert_lines, set_version, snapshot

CASES = [
    ("0.19.2", "0.19.1", "core_v0.19"),  # tag core_v0.19.0
    ("0.17.0", "0.17.0rc0", "core_v0.17"),  # tag core_v0.17.0
    ("0.19.2", "0.20.0", "core_v0.19"),  # main says 0.20.0; its files match no series
]


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLA_SEAM_ROOT"}
    env["PYTHONPATH"] = str(REPO_ROOT / "scripts")
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _set_info(tree: Path, version: str) -> None:
    """Write ``version`` into package_info.py the way upstream does (PRE_RELEASE for rc)."""
    core, _, pre = version.partition("rc")
    set_version(tree, core)
    if pre:
        info = tree / "megatron/core/package_info.py"
        info.write_text(info.read_text().replace('PRE_RELEASE = ""', f"PRE_RELEASE = 'rc{pre}'"))


@pytest.mark.parametrize("release, version, line", CASES, ids=[c[1] for c in CASES])
def test_upstream_version_strings_select_by_content(
    release: str,
    version: str,
    line: str,
    fresh_checkout: Callable[[str, Path], Path],
    tmp_path: Path,
) -> None:
    tree = fresh_checkout(release, tmp_path / "tree")
    _set_info(tree, version)
    commit(tree, f"package_info says {version}, as upstream's tag does")
    assert MegatronTree.resolve(tree).version == version
    before = snapshot(tree)
    done = _cli(str(tree))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mla-seam: applied {line} " in done.stdout
    status = _cli("--status", str(tree))
    assert status.returncode == 0 and status.stdout.splitlines()[0] == "applied", status.stdout
    check = _cli("--check", "--json", str(tree))
    report = json.loads(check.stdout)
    assert report["state"] == "applied" and report["series"] == line and report["current"]
    undo = _cli("--revert", str(tree))
    assert undo.returncode == 0, undo.stderr
    assert snapshot(tree) == before
    pristine = _cli("--status", str(tree))
    assert f"{line} (selected by content" in pristine.stdout, pristine.stdout


def test_newer_than_every_line_needs_series(
    fresh_checkout: Callable[[str, Path], Path], tmp_path: Path
) -> None:
    """main (0.20.0) with changed files: one line naming --series; with it, a fork apply."""
    tree = fresh_checkout("0.19.2", tmp_path / "main")
    _set_info(tree, "0.20.0")
    insert_lines(tree, [(LM, 3, "# main moved on")])
    commit(tree, "main")
    before = snapshot(tree)
    refused = _cli(str(tree))
    assert refused.returncode == 5
    assert refused.stderr.strip().count("\n") == 0 and "--series core_v0.19" in refused.stderr
    done = _cli("--series", "core_v0.19", str(tree))
    assert done.returncode == 0, done.stderr
    assert _cli("--status", str(tree)).stdout.startswith("applied on a fork")
    assert _cli("--revert", str(tree)).returncode == 0  # the line comes from the state record
    assert snapshot(tree) == before


def test_fingerprint_matches_only_the_right_line(
    megatron_checkout: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLA_SEAM_ROOT", raising=False)
    tree = MegatronTree.resolve(megatron_checkout("0.16.1"))
    start = time.perf_counter()
    matches, blobs = fingerprint(tree)
    elapsed = time.perf_counter() - start
    assert matches == ["core_v0.16"], matches
    assert len(blobs) >= 3 and all(blobs.values())
    sys.stdout.write(f"\n[fingerprint of 0.16.1 over every line: {elapsed * 1000:.1f} ms]\n")
