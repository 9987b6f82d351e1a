"""The job's record: steps, exit status, ``outcome.json`` and the job summary.

Exit status (:data:`EXIT_CODES`): 0 nothing to do; 17 upstream drift found (a target needs a
proposal or a human); 25 the overlay broke (a release the series serves fails, or a GPU verdict
says ``overlay_broke``); 26 the job broke (package index, git remote or GitHub unreachable, a
step crashed), with the cause: never reported as drift.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mla_seam.errors import (
    NIGHTLY_JOB_BROKE_EXIT,
    NIGHTLY_OVERLAY_BROKE_EXIT,
    DriftFoundError,
    SeamError,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DRIFT = 0, DriftFoundError.exit_code
EXIT_OVERLAY_BROKE, EXIT_JOB_BROKE = NIGHTLY_OVERLAY_BROKE_EXIT, NIGHTLY_JOB_BROKE_EXIT
EXIT_CODES = {
    EXIT_OK: "nothing to do",
    EXIT_DRIFT: "upstream drift found",
    EXIT_OVERLAY_BROKE: "the overlay broke",
    EXIT_JOB_BROKE: "the job broke",
}


class JobBroke(Exception):
    """A step failed for a reason that is not drift (network, a crash)."""


@dataclasses.dataclass
class Step:
    """One step's record for the summary."""

    name: str
    status: str = "pending"  # ok | skipped | failed
    seconds: float = 0.0
    note: str = ""


@dataclasses.dataclass
class Job:
    """Everything one phase of the job learned and did; written as outcome.json/summary.md."""

    out: Path
    phase: str = "cpu"
    steps: List[Step] = dataclasses.field(default_factory=list)
    discovered: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    new_tags: List[str] = dataclasses.field(default_factory=list)
    targets: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    gpu_targets: List[str] = dataclasses.field(default_factory=list)
    gpu_verdicts: Dict[str, str] = dataclasses.field(default_factory=dict)
    published: List[str] = dataclasses.field(default_factory=list)
    overlay_broke: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    report: Optional[Dict[str, Any]] = None
    broke: Optional[str] = None

    def step(self, name: str, body: Callable[[Step], None]) -> None:
        """Run one step; a :class:`JobBroke`, a named error or a crash marks the job broken
        and stops it (the cause goes into the summary, never as drift)."""
        step = Step(name)
        self.steps.append(step)
        start = time.monotonic()
        try:
            body(step)
            if step.status == "pending":
                step.status = "ok"
        except JobBroke as exc:
            step.status, step.note = "failed", str(exc)
            self.broke = f"{name}: {exc}"
        except SeamError as exc:
            step.status, step.note = "failed", exc.message
            self.broke = f"{name}: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")
        except Exception as exc:  # pylint: disable=broad-except
            step.status = "failed"
            step.note = f"{type(exc).__name__}: {exc}"
            self.broke = f"{name} crashed: {step.note}"
            log.error("nightly: %s crashed\n%s", name, traceback.format_exc())
        finally:
            step.seconds = round(time.monotonic() - start, 1)
        if self.broke:
            raise JobBroke(self.broke)

    @property
    def exit_code(self) -> int:
        """26 job broke > 25 overlay broke > 17 drift > 0."""
        if self.broke:
            return EXIT_JOB_BROKE
        if self.overlay_broke:
            return EXIT_OVERLAY_BROKE
        if self.phase not in ("cpu", "all"):
            return EXIT_OK  # drift is the CPU phase's verdict; publishing reports none
        if any(t.get("action") in ("propose", "human") for t in self.targets):
            return EXIT_DRIFT
        if self.report and self.report["summary"]["needs_work"]:
            return EXIT_DRIFT
        return EXIT_OK


def write_outcome(job: Job) -> None:
    """``outcome[-PHASE].json``, ``summary[-PHASE].md`` and, in Actions, the step outputs."""
    code = job.exit_code
    outcome = {
        "phase": job.phase,
        "exit_code": code,
        "outcome": EXIT_CODES[code],
        "broke": job.broke,
        "steps": [dataclasses.asdict(s) for s in job.steps],
        "discovered": job.discovered,
        "new_tags": job.new_tags,
        "targets": [
            {k: t.get(k) for k in ("name", "kind", "action", "commit")} for t in job.targets
        ],
        "gpu_targets": job.gpu_targets,
        "gpu_verdicts": job.gpu_verdicts,
        "published": job.published,
        "overlay_broke": job.overlay_broke,
        "notes": job.notes,
    }
    job.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if job.phase in ("cpu", "all") else f"-{job.phase}"
    (job.out / f"outcome{suffix}.json").write_text(
        json.dumps(outcome, indent=2) + "\n", encoding="utf-8"
    )
    (job.out / f"summary{suffix}.md").write_text(summary(job), encoding="utf-8")
    github = os.environ.get("GITHUB_OUTPUT")
    if github:
        with open(github, "a", encoding="utf-8") as handle:
            handle.write(f"exit_code={code}\n")
            handle.write(f"gpu_targets={','.join(job.gpu_targets)}\n")


def summary(job: Job) -> str:
    """The job summary in Markdown (what GitHub shows on the run page)."""
    code = job.exit_code
    what = EXIT_CODES[code] if code or job.phase in ("cpu", "all") else "done"
    out = [f"# mla-seam nightly ({job.phase}): {what} (exit {code})", ""]
    if job.broke:
        out += [f"**The job broke**: {job.broke}. This is not drift.", ""]
    out += ["| step | status | s | note |", "|---|---|---|---|"]
    out += [f"| {s.name} | {s.status} | {s.seconds} | {s.note} |" for s in job.steps]
    out.append("")
    if job.report:
        s = job.report["summary"]
        out.append(
            f"Drift: {s['supported']} of {s['tags']} tags supported"
            + (f"; needs work: {', '.join(s['needs_work_tags'])}" if s["needs_work"] else "")
            + "."
        )
    rows = [
        f"{t['name']} ({t['kind']}): {t['action']}"
        + (f", proposal patches/{t['proposal'].get('line_dir')}/" if t.get("proposal") else "")
        + (f" ({t['note']})" if t.get("note") else "")
        + (" (proposal failed)" if t.get("proposal") and not t["proposal"].get("ok") else "")
        for t in job.targets
    ]
    for label, items in (
        ("New or changed tags", job.new_tags),
        ("Moving targets", rows),
        ("GPU targets", [f"{t}: {job.gpu_verdicts.get(t, 'not run')}" for t in job.gpu_targets]),
        ("Published", job.published),
        ("Overlay broke on", job.overlay_broke),
        ("Notes", job.notes),
    ):
        if items:
            out += ["", f"**{label}**:", ""] + [f"- {item}" for item in items]
    out += ["", "Report: `drift/drift.md` (artifact); exit codes: "
            + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items())]  # fmt: skip
    return "\n".join(out).rstrip() + "\n"
