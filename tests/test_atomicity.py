"""Crash safety beyond SIGKILL at a named step (``test_integrity.py`` has those 200 trials):
SIGINT and SIGTERM (repaired before the process exits), whole ``python -m mla_seam`` processes
killed from outside at spread-out moments, a disk that fills up after the commit point, and
the list of crash steps itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List

import integrity
import pytest
from mla_seam.tree import CRASH_STEPS

SIGNAL_CASES = [
    ("apply", "worktree", "INT", "locked"),
    ("apply", "worktree", "INT", "journal-written"),
    ("apply", "worktree", "INT", "replaced:2"),
    ("apply", "worktree", "TERM", "replaced:3"),
    ("apply", "worktree", "TERM", "state-written"),
    ("apply", "worktree", "INT", "txn-removed"),
    ("revert", "worktree", "INT", "replaced:1"),
    ("revert", "worktree", "TERM", "txn-staged"),
    ("revert", "worktree", "TERM", "journal-removed"),
    ("apply", "commit", "INT", "commits-built"),
    ("apply", "commit", "TERM", "replaced:4"),
    ("apply", "commit", "INT", "state-written"),
    ("apply", "commit", "TERM", "head-moved"),
    ("revert", "commit", "INT", "journal-written"),
    ("revert", "commit", "TERM", "index-reset"),
]


@pytest.fixture(scope="module")
def templates(
    megatron_checkout: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[integrity.Templates]:
    yield integrity.Templates(
        megatron_checkout(integrity.RELEASE), tmp_path_factory.mktemp("atomicity")
    )


@pytest.mark.parametrize(
    "op, mode, sig, step", SIGNAL_CASES, ids=[f"{o}-{m}-SIG{s}-{t}" for o, m, s, t in SIGNAL_CASES]
)
def test_sigint_sigterm_repair_before_exit(
    op: str, mode: str, sig: str, step: str, templates: integrity.Templates, tmp_path: Path
) -> None:
    start, before, after = templates.get("release", op, mode)
    tree = integrity.copy(start, tmp_path / "tree")
    trial = integrity.Trial("release", op, mode, step)
    done = integrity.crash(trial.args(tree), step, sig)
    assert done.code == 128 + getattr(signal, f"SIG{sig}"), done.text
    assert f"interrupted by SIG{sig}" in done.err and not done.traceback, done.err
    committed = step in integrity.COMMITTED
    if committed:
        journal_left = step in ("state-written", "head-moved", "index-reset")
        told = "completed an interrupted" if journal_left else "already been committed"
    elif step in ("locked", "txn-staged", "commits-built"):
        told = "nothing had been written"
    else:
        told = "rolled back an interrupted"
    assert told in done.err, done.err
    # Repaired in-process already: no journal left, the tree in one of its two states.
    assert integrity.leftovers(tree) == []
    assert integrity.snapshot(tree) == (after if committed else before)


def _whole_process(args: List[str], delay: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLA_SEAM_")}
    env["PYTHONPATH"] = str(integrity.REPO_ROOT / "scripts")
    env.update(integrity.IDENT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mla_seam", "apply", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(delay)
    proc.kill()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("k", range(8))
def test_whole_process_killed_from_outside(
    k: int, templates: integrity.Templates, tmp_path: Path
) -> None:
    """``python -m mla_seam apply [--revert] [--commit]`` as users start it, SIGKILLed from
    outside at moments spread over its run (start-up included): the next run's repair leaves
    the tree before or after, never between, and a run after that completes."""
    op, mode = ("apply", "revert")[k % 2], ("worktree", "commit")[(k // 2) % 2]
    start, before, after = templates.get("release", op, mode)
    tree = integrity.copy(start, tmp_path / "tree")
    args = integrity.Trial("release", op, mode, "t").args(tree)
    killed = _whole_process(args, 0.25 + 0.2 * k)
    assert "Traceback" not in killed.stderr, killed.stderr
    integrity.recover(tree)
    assert integrity.snapshot(tree) in (before, after)
    assert integrity.leftovers(tree) == []
    again = integrity.apply_again(*args)
    assert again.code == 0, again.text
    assert integrity.snapshot(tree) == after


@pytest.mark.parametrize("mode", ["worktree", "commit"])
def test_disk_full_after_the_commit_point_says_the_run_completed(
    mode: str, templates: integrity.Templates, tmp_path: Path
) -> None:
    """A write failing after the commit point: exit 24, and the message says the apply is
    complete (never that a change was rolled back); the next run tidies up."""
    start, _, after = templates.get("release", "apply", mode)
    tree = integrity.copy(start, tmp_path / "tree")
    args = integrity.Trial("release", "apply", mode, "state-written").args(tree)
    done = integrity.apply(*args, env={"MLA_SEAM_CRASH_AT": "state-written",
                                       "MLA_SEAM_CRASH_SIGNAL": "ENOSPC"})  # fmt: skip
    assert done.code == 24 and not done.traceback, done.text
    assert "itself is complete" in done.err and "rolled back" not in done.err, done.err
    integrity.recover(tree)
    assert integrity.snapshot(tree) == after and integrity.leftovers(tree) == []


def test_crash_steps_are_all_reached() -> None:
    """Every step name exists in the code and the kill trials use every one of them (a renamed
    step would pass silently)."""
    source = (Path(__file__).resolve().parents[1] / "scripts" / "mla_seam").glob("*.py")
    text = "".join(p.read_text() for p in source)
    used = {t.step.split(":")[0] for t in integrity.trials()}
    used |= {t.recovery_step.split(":")[0] for t in integrity.trials() if t.recovery_step}
    for step in CRASH_STEPS:
        name = step.split(":")[0]
        assert (
            f'crash_point("{name}' in text
            or f'crash_point(f"{name}' in text
            or (f'"{name}" if' in text)
        ), step
        assert name in used, f"no kill trial at {step}"
