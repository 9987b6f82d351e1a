"""Helpers the CPU test modules share that are not fixtures (those are in conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pytest
from mla_seam import cli, gitlayer
from packaging.version import Version

#: The marker of tests the default run leaves out (conftest.py; ``--run-slow`` runs them).
slow = pytest.mark.slow


def newest_fast(
    values: Iterable[Any],
    version: Callable[[Any], str] = str,
    ids: Optional[Callable[[Any], str]] = None,
) -> List[Any]:
    """``pytest.param`` per value: the newest release in the default run, every other marked
    ``slow`` (same test on each release line: the newest stands for them until ``--run-slow``).

    Args:
        values: The parameters (a release, or a tuple holding one).
        version: The release of a value.
        ids: The test id of a value (default pytest's).
    """
    values = list(values)
    newest = max((version(v) for v in values), key=Version, default=None)
    return [
        pytest.param(
            *(v if isinstance(v, tuple) else (v,)),
            marks=() if version(v) == newest else slow,
            id=ids(v) if ids else None,
        )
        for v in values
    ]


# --- real checkouts and the bundle copy of the rebase, drift and nightly tests ----------------

REPO = Path(__file__).resolve().parents[1]
COMBO = ("0.13.1", "0.14.0", "0.16.1", "0.17.1", "0.18.2", "0.19.2")
MLA = "megatron/core/transformer/multi_latent_attention.py"
LM = "megatron/core/models/common/language_module/language_module.py"
TL = "megatron/core/transformer/transformer_layer.py"
TC = "megatron/core/transformer/transformer_config.py"
#: The date of the rebase tests' synthetic commits.
REBASE_DATE = "2026-11-27T12:00:00+00:00"


def make_bundle(dest: Path) -> Path:
    """A writable copy of the repository's ``patches/`` and ``overlay/`` at ``dest``."""
    for name in ("patches", "overlay"):
        shutil.copytree(REPO / name, dest / name)
    return dest


def run(capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, str]:
    """``mla-seam ARGS`` in this process: exit code and stdout."""
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def run_subprocess(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m mla_seam ARGS`` (for exit codes under signals and messages on stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_of(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def repo_state(path: Path) -> Tuple[str, str, str, str]:
    """HEAD, refs, index and work-tree status of a checkout: what rebase must never change."""
    repo = gitlayer.open_repo(path)
    assert repo is not None
    return (
        repo.git.rev_parse("HEAD"),
        repo.git.for_each_ref(),
        repo.git.ls_files("--stage"),
        repo.git.status("--porcelain", "--ignored"),
    )


def commit_all(repo_dir: Path, message: str) -> str:
    """Commit every change in ``repo_dir`` with a fixed identity (a synthetic upstream commit)."""
    repo = gitlayer.open_repo(repo_dir)
    return gitlayer.commit_all(repo, message, REBASE_DATE)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
