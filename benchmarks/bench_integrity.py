"""Integrity of ``mla-seam apply`` under SIGKILL and bad input, counted.

    PYTHONPATH=scripts python benchmarks/bench_integrity.py [--outside N] [--seed S]

Runs every kill trial of the test suite (``tests/integrity.py``: apply and revert, working-tree
and commit mode, a release, a fork needing ``--3way`` that already holds one hook, a plain folder;
SIGKILL at every step, during the next run's recovery, and from outside), each followed by the
command run again to its end; then N more kills of whole ``python -m mla_seam`` processes from
outside at random moments (default 40); then every row of the bad-input sweep
(``tests/sweep.py``). Prints the counts: trials, inconsistent outcomes (a tree that is neither as
before nor as the finished run leaves it, leftovers, or a next run that does not finish), bad
inputs, tracebacks, false successes (exit 0 where the row must fail, or a success the tree does
not bear out) and other mismatches, and the wall time of each part.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

import integrity  # noqa: E402  pylint: disable=wrong-import-position
import sweep  # noqa: E402  pylint: disable=wrong-import-position
from mla_seam import upstream  # noqa: E402  pylint: disable=wrong-import-position


def _whole_process_kill(templates: integrity.Templates, tmp: Path, rng: random.Random) -> str:
    op, mode = rng.choice(["apply", "revert"]), rng.choice(["worktree", "commit"])
    start, before, after = templates.get("release", op, mode)
    tree = integrity.copy(start, tmp / "tree")
    args = integrity.Trial("release", op, mode, "t").args(tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLA_SEAM_")}
    env.update(integrity.IDENT, PYTHONPATH=str(ROOT / "scripts"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mla_seam", "apply", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    _, err = proc.communicate()
    if b"Traceback" in err:
        return "traceback in the killed process"
    integrity.recover(tree)
    if integrity.snapshot(tree) not in (before, after) or integrity.leftovers(tree):
        return f"inconsistent after a kill of {op} {mode}"
    again = integrity.apply_again(*args)
    if again.code != 0 or integrity.snapshot(tree) != after:
        return f"the next {op} {mode} did not finish: {again.text[-300:]}"
    return ""


def _guarded(check: Callable[[], str]) -> str:
    """A check's problem, or the exception that escaped it (counted, never fatal)."""
    try:
        return check()
    except Exception as exc:  # pylint: disable=broad-except
        return f"the check itself failed: {type(exc).__name__}: {exc}"


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outside", type=int, default=40, help="whole-process kills from outside")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    release = upstream.get(integrity.RELEASE)
    counts: Dict[str, int] = {}
    problems: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        base = Path(tmp)
        templates = integrity.Templates(release, base / "templates")
        (base / "templates").mkdir()
        started = time.perf_counter()
        for k, trial in enumerate(integrity.trials()):
            work = base / f"trial-{k}"
            work.mkdir()
            problem = _guarded(lambda: integrity.run_trial(trial, templates, work, finish=True))
            counts["kill trials"] = counts.get("kill trials", 0) + 1
            if problem:
                counts["inconsistent"] = counts.get("inconsistent", 0) + 1
                problems.append(f"{trial.id}: {problem[:300]}")
        kills = time.perf_counter() - started
        rng = random.Random(args.seed)
        started = time.perf_counter()
        for k in range(args.outside):
            work = base / f"outside-{k}"
            work.mkdir()
            problem = _guarded(lambda: _whole_process_kill(templates, work, rng))
            counts["whole-process kills"] = counts.get("whole-process kills", 0) + 1
            if problem:
                counts["inconsistent"] = counts.get("inconsistent", 0) + 1
                problems.append(f"outside-{k}: {problem}")
        outside = time.perf_counter() - started
        started = time.perf_counter()
        for k, row in enumerate(sweep.rows()):
            work = base / f"row-{k}"
            work.mkdir()
            problem = _guarded(lambda: sweep.run_row(row, templates, work))
            key = "bad inputs" if row.works is None else "odd inputs that must work"
            counts[key] = counts.get(key, 0) + 1
            if problem:
                kind = (
                    "tracebacks" if problem.startswith("traceback")
                    else "false successes" if problem.startswith(("exit 0 ", "claimed", "said"))
                    else "other mismatches"
                )  # fmt: skip
                counts[kind] = counts.get(kind, 0) + 1
                problems.append(f"{row.id}: {problem[:300]}")
        bad = time.perf_counter() - started
    for key in (
        "kill trials",
        "whole-process kills",
        "inconsistent",
        "bad inputs",
        "odd inputs that must work",
        "tracebacks",
        "false successes",
        "other mismatches",
    ):
        sys.stdout.write(f"{key}: {counts.get(key, 0)}\n")  # fmt: skip
    sys.stdout.write(
        f"time: kill trials {kills:.0f} s, whole-process kills {outside:.0f} s, "
        f"inputs {bad:.0f} s\n"
    )
    for problem in problems:
        sys.stdout.write(f"PROBLEM {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
