"""Integrity of every path of ``mla-seam apply``: SIGKILL anywhere, bad input of every kind.

Kill trials (:func:`integrity.trials`, 200 of them): apply and revert, in working-tree and commit
mode, on a release, on a fork that needs ``--3way`` and already holds one hook, and on a plain
folder, killed with SIGKILL at every step of the transaction, during the next run's recovery, and
from outside at moments spread over the run. After each kill, the next run's recovery must leave
the tree exactly as it was before or exactly as the finished run leaves it (files, HEAD's tree,
history length, index, status), and the run after that must finish the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import integrity
import pytest
import sweep
from support import sample_fast

TRIALS = integrity.trials()


@pytest.fixture(scope="module")
def templates(
    megatron_checkout: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[integrity.Templates]:
    yield integrity.Templates(
        megatron_checkout(integrity.RELEASE), tmp_path_factory.mktemp("integrity")
    )


def test_there_are_at_least_200_kill_trials() -> None:
    assert len(TRIALS) >= 200
    assert {(t.op, t.mode) for t in TRIALS} == {
        (op, mode) for op in ("apply", "revert") for mode in ("worktree", "commit")
    }


# The default run: the first trial of each (op, mode, tree) and every tenth; --run-slow: all.
@pytest.mark.parametrize(
    "trial", sample_fast(TRIALS, lambda t: (t.variant, t.op, t.mode), 10, lambda t: t.id)
)
def test_sigkill(trial: integrity.Trial, templates: integrity.Templates, tmp_path: Path) -> None:
    # Every trial checks the repaired tree; one in three (and every kill during recovery or
    # from outside) also runs the command again to the end.
    finish = (
        bool(trial.recovery_step) or trial.step.startswith("t=") or (TRIALS.index(trial) % 3 == 0)
    )
    problem = integrity.run_trial(trial, templates, tmp_path, finish=finish)
    assert problem == "", problem


# --- the bad-input sweep ---------------------------------------------------------------------

ROWS = sweep.rows()


def test_there_are_at_least_200_distinct_bad_inputs() -> None:
    ids = [r.id for r in ROWS]
    assert len(set(ids)) == len(ids), "row ids must be distinct"
    assert len([r for r in ROWS if r.works is None]) >= 200
    assert {r.kind for r in ROWS} == {"state", "journal", "store", "bundle", "args", "git", "tree"}


# The default run: the first row of each kind and every tenth; --run-slow: all.
@pytest.mark.parametrize("row", sample_fast(ROWS, lambda r: r.kind, 10, lambda r: r.id))
def test_bad_input(row: sweep.Row, templates: integrity.Templates, tmp_path: Path) -> None:
    problem = sweep.run_row(row, templates, tmp_path)
    assert problem == "", problem


# --- --check predicts apply ------------------------------------------------------------------

PARITY = [
    ("pristine", []), ("pristine", ["--commit"]), ("pristine", ["--3way"]),
    ("pristine", ["--commit", "--3way"]), ("pristine", ["--series", "core_v0.16"]),
    ("pristine", ["--series", "core_v0.13", "--3way"]), ("applied", []),
    ("applied", ["--series", "core_v0.13"]), ("applied", ["--series", "core_v0.13", "--3way"]),
    ("applied", ["--commit"]), ("applied-commit", []), ("fork", []), ("fork", ["--3way"]),
    ("fork", ["--commit"]), ("fork", ["--commit", "--3way"]), ("plain", []),
    ("plain", ["--commit"]), ("plain-applied", ["--series", "core_v0.18"]),
    ("locked", ["--commit"]), ("locked", []), ("dirty", []), ("dirty", ["--commit"]),
    ("plain-fork", ["--3way"]), ("plain-fork", []),
]  # fmt: skip


def _parity_tree(name: str, templates: integrity.Templates, dest: Path) -> Path:
    base = {"locked": "pristine", "dirty": "pristine", "plain-fork": "plain"}.get(name, name)
    tree = integrity.copy(templates.get(*sweep.STARTS[base])[0], dest)
    if name == "locked":
        (tree / ".git" / "index.lock").write_text("")
    elif name == "dirty":
        with open(tree / integrity.TC, "a", encoding="utf-8") as handle:
            handle.write("# my uncommitted work\n")
    elif name == "plain-fork":
        fork = templates.get(*sweep.STARTS["fork"])[0]
        for rel in integrity.FILES:
            (tree / rel).write_bytes((fork / rel).read_bytes())
    return tree


@pytest.mark.parametrize(
    "start, flags", PARITY, ids=[f"{s}{''.join(f) or '-no-flags'}" for s, f in PARITY]
)
def test_check_exits_with_the_code_apply_then_exits_with(
    start: str, flags: list, templates: integrity.Templates, tmp_path: Path
) -> None:
    """``--check`` runs apply's own code up to its first write: same exit code for every flag,
    and when it says apply would work, apply works."""
    checked = _parity_tree(start, templates, tmp_path / "checked")
    applied = _parity_tree(start, templates, tmp_path / "applied")
    before = integrity.snapshot(checked)
    check = integrity.apply("--check", *flags, str(checked))
    done = integrity.apply(*flags, str(applied))
    assert not check.traceback and not done.traceback, check.text + done.text
    assert check.code == done.code, f"--check {check.code}, apply {done.code}:\n{check.text}"
    assert integrity.snapshot(checked) == before, "--check changed the tree"
    if check.code == 0:
        assert "check passed" in check.out or "apply would change nothing" in check.out
        status = integrity.apply("--status", str(applied))
        assert status.code == 0 and status.out.startswith("applied"), status.text
    else:
        assert "apply would refuse" in check.out
        said = [t.replace(str(checked), "TREE") for t in check.err.splitlines()[-2:]]
        assert said == [t.replace(str(applied), "TREE") for t in done.err.splitlines()[-2:]]
