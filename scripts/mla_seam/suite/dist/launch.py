"""Running the cases: one ``torchrun`` process group per tree, a resume journal per side."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mla_seam.suite.dist.cases import STARTUP_S, WORKER, Case

log = logging.getLogger(__name__)

# --- running -------------------------------------------------------------------------------------


def read_journal(path: Path) -> Tuple[Dict[str, Dict[str, Any]], Optional[str]]:
    """Results by case name, and the case that started without a result (if any)."""
    results: Dict[str, Dict[str, Any]] = {}
    open_case = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return results, None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "start":
            open_case = record.get("name")
        elif record.get("event") == "result":
            results[record["name"]] = record
            if open_case == record["name"]:
                open_case = None
    return results, open_case


def _append(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def _lost(case: Case, side: str, why: str, tail: str) -> Dict[str, Any]:
    return {
        "event": "result",
        "case": "multigpu",
        "name": case.name,
        "kind": case.kind,
        "layout": case.plan()["layout"],
        "spec": case.spec,
        "side": side,
        "outcome": why,
        "message": tail[-1500:],
        "checks": {},
        "ok": False,
    }


def run_side(
    side: str,
    tree: str,
    cases: Sequence[Case],
    *,
    nproc: int,
    python: str,
    repo: Path,
    state: Path,
    backend: Optional[str],
    deadline: float,
) -> List[Dict[str, Any]]:
    """Run ``cases`` in one tree until each has a result or time is up; returns the results."""
    journal = state / f"records.{side}.jsonl"
    plan = state / "plan.json"
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {c.name: c for c in cases}
    attempt = 0
    while True:
        done, open_case = read_journal(journal)
        if open_case in by_name:
            _append(journal, _lost(by_name[open_case], side, "crashed", "process group died"))
            done, _ = read_journal(journal)
        pending = [c for c in cases if c.name not in done]
        left = deadline - time.monotonic()
        if not pending or left < 30:
            break
        attempt += 1
        budget = int(min(left, STARTUP_S + sum(c.budget_s for c in pending)))
        code, tail = _torchrun(
            side, tree, pending, nproc, python, repo, plan, journal, backend, budget,
            logs / f"{side}-{attempt}.log",
        )  # fmt: skip
        done, open_case = read_journal(journal)
        if open_case in by_name:
            why = "timeout" if code is None else "crashed"
            _append(journal, _lost(by_name[open_case], side, why, tail))
        elif not any(c.name in done for c in pending):
            # The group never reached a case: starting again would fail the same way.
            why = "timeout" if code is None else "not_started"
            for case in pending:
                _append(journal, _lost(case, side, why, tail))
            break
    done, _ = read_journal(journal)
    out = []
    for case in cases:
        record = done.get(case.name)
        if record is None:
            record = _lost(case, side, "not_run", "time budget used up before this case")
        out.append(record)
    return out


def _torchrun(side, tree, cases, nproc, python, repo, plan, journal, backend, budget, logfile):
    cmd = [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(repo / WORKER), "--plan", str(plan), "--records", str(journal),
        "--cases", ",".join(c.name for c in cases),
    ]  # fmt: skip
    if backend:
        cmd += ["--backend", backend]
    env = dict(os.environ)
    env.update(
        MLA_SEAM_MEGATRON_TREE=tree,
        MLA_SEAM_SIDE=side,
        PYTHONUNBUFFERED="1",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    log.info("mla-seam suite: %d case(s) on %d ranks, %s tree ...", len(cases), nproc, side)
    start = time.monotonic()
    with open(logfile, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: Optional[int] = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    tail = Path(logfile).read_text(encoding="utf-8", errors="replace")[-3000:]
    log.info(
        "mla-seam suite: %s tree %s after %.0f s",
        side,
        "timed out" if code is None else f"exit {code}",
        time.monotonic() - start,
    )
    return code, tail
