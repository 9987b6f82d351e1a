"""Suite processes spread over the GPUs of one host: a job per process, a GPU (or N) per job.

A three-tree suite of one release runs for 10-12 minutes on one GPU; a host with several GPUs
runs several releases side by side. :func:`run_jobs` starts each :class:`Job` on free devices
(``CUDA_VISIBLE_DEVICES``), one job per ``key`` at a time (jobs that write the same results file
share a key), and, with a deadline, only jobs whose estimate still fits (a lent machine's call
limit); the rest are left for a later run. Used by the suite's driver of several lines
(:mod:`mla_seam.suite.lines`: the device runs that committed ``results/``, the nightly's GPU
phase).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

#: Outcomes of a job besides its exit status.
LEFT, KILLED = "left for a later run", "killed at the deadline"


@dataclasses.dataclass
class Job:
    """One process of the fleet.

    Attributes:
        name: What the log calls it.
        argv: The command.
        key: Jobs with one key never run at the same time (default: the name).
        gpus: Devices it needs.
        estimate: Seconds it is expected to take (only read against a deadline).
        env: Extra environment.
        rc: Exit status once it ended (``None``: not run or killed).
        outcome: ``"ran"``, :data:`LEFT` or :data:`KILLED`.
        seconds: Wall time it ran.
        devices: The device indices it got.
        log_path: Its combined stdout and stderr.
    """

    name: str
    argv: Sequence[str]
    key: str = ""
    gpus: int = 1
    estimate: float = 0.0
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rc: Optional[int] = None
    outcome: str = ""
    seconds: float = 0.0
    devices: Sequence[int] = ()
    log_path: Optional[Path] = None

    def tail(self, lines: int = 3) -> str:
        """The last lines of its output (``""`` when there is none)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (AttributeError, OSError):
            return ""
        return " / ".join(text.strip().splitlines()[-lines:])


def run_jobs(
    jobs: Sequence[Job],
    devices: Sequence[int],
    logs: Path,
    deadline_s: Optional[float] = None,
    poll_s: float = 0.5,
) -> List[Job]:
    """Run ``jobs`` in their order over ``devices``; return them with their outcomes.

    A job starts as soon as its key is free and enough devices are idle; with ``deadline_s`` it
    starts only if its estimate fits in the time left (else it is :data:`LEFT`), and a job
    still running at the deadline is killed (:data:`KILLED`). Each process gets
    ``CUDA_VISIBLE_DEVICES`` and, unless set, ``OMP_NUM_THREADS`` of its share of the cores.

    Args:
        jobs: The jobs, in the order they should start.
        devices: Device indices to hand out (at least one).
        logs: Folder for each job's output (``<index>-<name>.log``).
        deadline_s: Seconds from now after which nothing runs.
        poll_s: How often running processes are checked.
    """
    if not devices:
        raise ValueError("run_jobs needs at least one device")
    logs.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + deadline_s if deadline_s is not None else None
    threads = str(max(1, (os.cpu_count() or 1) // len(devices)))
    pending, running, free = list(jobs), [], list(devices)
    procs: Dict[int, subprocess.Popen] = {}
    started: Dict[int, float] = {}
    while pending or running:
        late = end is not None and time.monotonic() > end
        for job in list(running):
            proc = procs[id(job)]
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                job.outcome = KILLED
            else:
                job.rc, job.outcome = proc.returncode, "ran"
            job.seconds = round(time.monotonic() - started[id(job)], 1)
            log.info("fleet: %s %s after %.0f s", job.name, job.outcome, job.seconds)
            running.remove(job)
            free.extend(job.devices)
        busy = {j.key or j.name for j in running}
        left = None if end is None else end - time.monotonic()
        for job in list(pending):
            if left is not None and job.estimate > left:
                job.outcome = LEFT
                pending.remove(job)
                log.info("fleet: %s left (estimate %.0f s > %.0f s)", job.name, job.estimate, left)
                continue
            if (job.key or job.name) in busy or len(free) < job.gpus:
                continue
            job.devices, free = tuple(free[: job.gpus]), free[job.gpus :]
            env = dict(os.environ, **job.env)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.devices))
            env.setdefault("OMP_NUM_THREADS", threads)
            slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in job.name)[:80]
            job.log_path = logs / f"{len(started):03d}-{slug}.log"
            with open(job.log_path, "wb") as sink:
                procs[id(job)] = subprocess.Popen(
                    list(job.argv), env=env, stdout=sink, stderr=subprocess.STDOUT
                )
            started[id(job)] = time.monotonic()
            running.append(job)
            busy.add(job.key or job.name)
            pending.remove(job)
            log.info("fleet: %s on device(s) %s", job.name, job.devices)
        if running:
            time.sleep(poll_s)
    return list(jobs)
