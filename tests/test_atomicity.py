"""Crash safety: kill ``mla-seam apply`` / ``--revert`` at every step of the commit protocol.

The CLI runs in a subprocess with ``MLA_SEAM_CRASH_AT=<step>``: at that step it signals itself
(SIGKILL at every step; SIGINT and SIGTERM at some). Afterwards the tree must be fully pristine
or fully applied once the next run's recovery has run (for SIGINT/SIGTERM: already on exit),
and a following run must end in the wanted state, with HEAD and the index untouched.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import test_series
from mla_seam.errors import STATUS_EXIT_CODES
from mla_seam.tree import CRASH_STEPS
from test_series import (
    _MEMO,
    copy_tree,
    run_cli,
    snapshot,
    state_dir,
    tree_hash,
)

N_FILES = 4  # the synthetic series changes 3 patched files + the overlay
STEPS: List[str] = []
for _step in CRASH_STEPS:
    if _step.startswith("recover-"):
        continue
    if _step.endswith(":<k>"):
        STEPS += [_step.replace("<k>", str(k)) for k in range(1, N_FILES + 1)]
    else:
        STEPS.append(_step)
COMMITTED = {"state-written", "journal-removed", "txn-removed"}  # at or after the commit point

# Fixtures shared with the other apply tests (defined in test_series), registered here.
bundle = test_series.bundle
make_tree = test_series.make_tree
seam_base = test_series.seam_base
seam_env = test_series.seam_env


def _refs(
    env: Dict[str, str], make_tree: Callable[..., Path], git: bool
) -> Tuple[Path, Path, str, str]:
    """Templates of a pristine and an applied 0.16.1 tree, and their tree hashes (memoized)."""
    key = f"atomicity-{git}"
    if key not in _MEMO:
        pristine = make_tree("0.16.1", git=git, name=f"{key}-pristine")
        applied = copy_tree(pristine, pristine.parent / f"{key}-applied")
        assert run_cli(env, str(applied)).returncode == 0
        _MEMO[key] = (pristine, applied, tree_hash(pristine), tree_hash(applied))
    return _MEMO[key]


def _crash(
    env: Dict[str, str], args: List[str], step: str, sig: str
) -> subprocess.CompletedProcess:
    return run_cli(env, *args, extra={"MLA_SEAM_CRASH_AT": step, "MLA_SEAM_CRASH_SIGNAL": sig})


def _expect(op: str, step: str) -> str:
    """The state the tree must be in after a crash at ``step`` and recovery."""
    done = step in COMMITTED
    if op == "apply":
        return "applied" if done else "not applied"
    return "not applied" if done else "applied"


def _after_crash(
    env: Dict[str, str], tree: Path, refs: Tuple[Path, Path, str, str], want: str, head: object
) -> None:
    """Recovery by --status, then the state the tree must be in, bytes and git alike."""
    status = run_cli(env, "--status", str(tree))
    assert status.returncode == STATUS_EXIT_CODES[want], status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == want
    assert tree_hash(tree) == (refs[3] if want == "applied" else refs[2])
    assert snapshot(tree)[1] == head, "HEAD or the index changed"
    assert not (state_dir(tree) / "txn").exists()


@pytest.mark.parametrize("op", ["apply", "revert"])
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_every_step(
    op: str, step: str, seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    refs = _refs(seam_env, make_tree, git=True)
    tree = copy_tree(refs[0] if op == "apply" else refs[1], tmp_path / "tree")
    head = snapshot(tree)[1]
    args = [str(tree)] if op == "apply" else ["--revert", str(tree)]
    killed = _crash(seam_env, args, step, "KILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _after_crash(seam_env, tree, refs, _expect(op, step), head)
    final = run_cli(seam_env, *args)
    assert final.returncode == 0, final.stderr
    assert tree_hash(tree) == (refs[3] if op == "apply" else refs[2])


SIGNAL_CASES = [
    ("apply", "INT", "locked"),
    ("apply", "INT", "journal-written"),
    ("apply", "INT", "replaced:2"),
    ("apply", "TERM", "replaced:3"),
    ("apply", "TERM", "state-written"),
    ("apply", "INT", "txn-removed"),
    ("revert", "INT", "replaced:1"),
    ("revert", "TERM", "txn-staged"),
    ("revert", "TERM", "journal-removed"),
]


@pytest.mark.parametrize(
    "op, sig, step", SIGNAL_CASES, ids=[f"{o}-SIG{s}-{t}" for o, s, t in SIGNAL_CASES]
)
def test_sigint_sigterm_repair_before_exit(
    op: str,
    sig: str,
    step: str,
    seam_env: Dict[str, str],
    make_tree: Callable[..., Path],
    tmp_path: Path,
) -> None:
    refs = _refs(seam_env, make_tree, git=True)
    tree = copy_tree(refs[0] if op == "apply" else refs[1], tmp_path / "tree")
    head = snapshot(tree)[1]
    args = [str(tree)] if op == "apply" else ["--revert", str(tree)]
    done = _crash(seam_env, args, step, sig)
    assert done.returncode == 128 + getattr(signal, f"SIG{sig}"), done.stderr
    assert f"interrupted by SIG{sig}" in done.stderr
    want = _expect(op, step)
    if step in COMMITTED:
        told = "completed an interrupted" if step == "state-written" else "already been committed"
    elif step in ("locked", "txn-staged"):
        told = "nothing had been written"
    else:
        told = "rolled back an interrupted"
    assert told in done.stderr, done.stderr
    # Repaired in-process already: no journal left, the tree in one of its two states.
    assert not (state_dir(tree) / "txn").exists()
    assert tree_hash(tree) == (refs[3] if want == "applied" else refs[2])
    _after_crash(seam_env, tree, refs, want, head)


@pytest.mark.parametrize(
    "step", ["recover-restored:1", "recover-restored:3", "recover-journal-removed"]
)
def test_sigkill_during_recovery(
    step: str, seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    refs = _refs(seam_env, make_tree, git=True)
    tree = copy_tree(refs[0], tmp_path / "tree")
    head = snapshot(tree)[1]
    assert _crash(seam_env, [str(tree)], "replaced:4", "KILL").returncode == -signal.SIGKILL
    again = _crash(seam_env, ["--status", str(tree)], step, "KILL")
    assert again.returncode == -signal.SIGKILL, again.stderr
    _after_crash(seam_env, tree, refs, "not applied", head)
    assert run_cli(seam_env, str(tree)).returncode == 0
    assert tree_hash(tree) == refs[3]


@pytest.mark.parametrize("op", ["apply", "revert"])
@pytest.mark.parametrize("step", ["txn-staged", "replaced:2", "state-written"])
def test_sigkill_on_a_plain_tree(
    op: str, step: str, seam_env: Dict[str, str], make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    refs = _refs(seam_env, make_tree, git=False)
    tree = copy_tree(refs[0] if op == "apply" else refs[1], tmp_path / "tree")
    args = [str(tree)] if op == "apply" else ["--revert", str(tree)]
    assert _crash(seam_env, args, step, "KILL").returncode == -signal.SIGKILL
    _after_crash(seam_env, tree, refs, _expect(op, step), None)
    assert run_cli(seam_env, *args).returncode == 0
    assert tree_hash(tree) == (refs[3] if op == "apply" else refs[2])
    if op == "revert":
        assert not (tree / ".mla-seam").exists(), "a reverted plain tree keeps no state folder"


def test_crash_steps_are_all_reached(
    seam_env: Dict[str, str], make_tree: Callable[..., Path]
) -> None:
    """Every step name the matrix uses exists in the code (a renamed step would pass silently)."""
    source = (Path(__file__).resolve().parents[1] / "scripts" / "mla_seam").glob("*.py")
    text = "".join(p.read_text() for p in source)
    for step in CRASH_STEPS:
        name = step.split(":")[0]
        assert f'crash_point("{name}' in text or f'crash_point(f"{name}' in text, step
