"""Several suites (release lines, moving targets) spread over the GPUs of one host, in a deadline.

A lent machine gives at most 10 minutes a call, a three-tree run of one release takes 10-12
minutes on one H200, and a host has 1-8 GPUs; the nightly runs one suite per changed target on
each free GPU. :func:`run_lines` is the one driver for both: every :class:`Line` (a set of staged
trees and its results folder) becomes suite processes (``python -m mla_seam.suite``), spread
over the GPUs by :mod:`mla_seam.suite.fleet`, one process per line at a time (a results file
has one writer). A line runs either whole (one process, the nightly's way) or in chunks of
units (:data:`CHUNKS`, one ``--only`` process each, merged into ``<out>/<tag>/<card>/
results.json``); a chunk starts only when its estimate fits before the deadline, and units
already in the results file are not run again, so a second call with the same results folder
finishes what the first left. Each line's outcome names its results folder; nothing is found
by searching.

From the command line (:mod:`mla_seam.suite.command`)::

    mla-seam suite --out OUT --work TREES --deadline-s 540 --release 0.18.2:0.16.1 \\
        --release 0.16.1:none --release 0.19.2:0.16.1=parity,bench \\
        [--target .device/dev.tar.gz:0.19.2] [--dist 0.16.1:2] [--gpus 0,1,2,3]

``--release V:BASE[=UNITS]`` (BASE ``none``: two trees; UNITS: phase or unit names, run again
even when done; default: what is not done yet of the whole suite but ``local-vs-te``).
``--target ARCHIVE:BASE[=UNITS]`` does the same for a moving target (main, dev) carried as a
``git archive`` of its ``megatron/`` folder (:class:`~mla_seam.suite.trees.Source`; the series is
the one the content selects; results in ``OUT/<target>/<card>/``). ``--dist V:N`` also runs
the multi-GPU cases of V on N GPUs. Writes ``OUT/run_lines.log``, ``OUT/run_lines.json`` (units
done per results tag) and each process's output under ``OUT/logs/``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mla_seam import releases
from mla_seam.suite import fleet
from mla_seam.suite.device import DeviceInfo
from mla_seam.suite.runner import results_folder
from mla_seam.suite.trees import Source, inspect_tree, stage

#: Units run together in one suite process (one merge each), in the order they are started.
CHUNKS = (
    ("matrix",),
    ("oracles",),
    ("thd-sweep", "thd-sweep@vanilla", "thd-sweep@base"),
    ("smoke", "smoke@vanilla", "golden", "golden@vanilla", "golden@base"),
    ("parity", "parity@vanilla", "parity@base", "kernels", "kernels@vanilla"),
    ("graphs", "graphs@vanilla"),
    ("bench", "bench@vanilla", "bench@base", "local-vs-te"),
)
#: Seconds per unit on one H200 (core_v0.19.2, 2026-11-29; older lines are faster).
ESTIMATE = {
    "smoke": 33, "smoke@vanilla": 24, "oracles": 90, "matrix": 108, "golden": 23,
    "golden@vanilla": 19, "golden@base": 21, "thd-sweep": 45, "thd-sweep@vanilla": 40,
    "thd-sweep@base": 37, "parity": 36, "parity@vanilla": 33, "parity@base": 33, "kernels": 25,
    "kernels@vanilla": 41, "graphs": 60, "graphs@vanilla": 60, "bench": 30, "bench@vanilla": 30,
    "bench@base": 30, "local-vs-te": 30,
}  # fmt: skip
#: The suite process's own start (device probe, tree inspection, merge).
START_S = 12
#: A whole three-tree suite in one process (the nightly's lines).
WHOLE_S = 900
#: The multi-GPU cases of one release.
DIST_S = 200
#: Files in the output folder of :func:`write_summary`.
LOG_NAME, SUMMARY_NAME = "run_lines.log", "run_lines.json"


@dataclasses.dataclass
class Line:
    """One suite's trees and where its results go.

    Attributes:
        key: Its name in logs and the fleet (one process per key at a time).
        trees: ``{role: path}`` as :func:`mla_seam.suite.trees.stage` returns them.
        out: Results root; the run writes ``<out>/<tag>/<card>/``.
        units: Units (or phases) to run, again if already done; ``None``: what is not done yet.
        whole: One process for the whole suite (no ``--only``, no merge).
    """

    key: str
    trees: Dict[str, Path]
    out: Path
    units: Optional[Set[str]] = None
    whole: bool = False

    @property
    def tag(self) -> str:
        """The results tag of the patched tree (``core_v0.19.2``, ``dev``)."""
        return inspect_tree(self.trees["patched"], "--megatron").tag


@dataclasses.dataclass
class LineOutcome:
    """What became of a :class:`Line`.

    Attributes:
        line: The line.
        folder: Its results folder, ``<out>/<tag>/<card>``.
        jobs: Its suite processes with their outcomes (:class:`mla_seam.suite.fleet.Job`).
        done: Units in its ``results.json`` now (run to the end, ok or not).
    """

    line: Line
    folder: Path
    jobs: List[fleet.Job]
    done: List[str]

    @property
    def verdict(self) -> Optional[Dict[str, Any]]:
        """Its ``verdict.json`` (``None``: no run wrote one)."""
        try:
            return json.loads((self.folder / "verdict.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def parse_spec(spec: str) -> Tuple[str, Optional[str], Optional[Set[str]]]:
    """``WHAT[:BASE][=UNITS]`` -> ``(what, base or None, units or None)``; BASE ``none``: None."""
    head, _, units = spec.partition("=")
    what, _, base = head.rpartition(":") if ":" in head else (head, "", "")
    return (
        what,
        None if base in ("", "none") else base,
        ({u for u in units.split(",") if u} if units else None),
    )


def release_line(spec: str, out: Path, work: Path) -> Line:
    """The :class:`Line` of ``V:BASE[=UNITS]`` (its trees staged from the cache)."""
    version, base, units = parse_spec(spec)
    return Line(releases.tag_of(version), stage(version, base, work), out, units)


def target_line(spec: str, out: Path, work: Path) -> Line:
    """The :class:`Line` of a moving target's ``ARCHIVE:BASE[=UNITS]``, keyed by its tag."""
    archive, base, units = parse_spec(spec)
    line = Line("", stage(Source.of_archive(archive), base, work), out, units)
    line.key = line.tag
    return line


def done_units(folder: Path) -> Set[str]:
    """Units already in ``folder/results.json`` (run to the end, ok or not)."""
    try:
        data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {p["name"] for p in data.get("phases", []) if not p.get("timed_out")}


def _argv(line: Line, python: str) -> List[str]:
    argv = [python, "-m", "mla_seam.suite", "--out", str(line.out)]
    for role, flag in (("patched", "--megatron"), ("vanilla", "--vanilla-megatron"),
                       ("base", "--base-megatron")):  # fmt: skip
        if role in line.trees:
            argv += [flag, str(line.trees[role])]
    return argv


def line_jobs(line: Line, folder: Path, python: str) -> List[fleet.Job]:
    """The suite processes a line still needs: one for a whole line, else one per chunk of
    units not yet in ``folder``'s results."""
    if line.whole:
        return [fleet.Job(line.key, _argv(line, python), key=line.key, estimate=WHOLE_S)]
    done = done_units(folder)
    trees, wanted = line.trees, line.units
    jobs = []
    for chunk in CHUNKS:
        pick = []
        for unit in chunk:
            phase, _, role = unit.partition("@")
            role = role or "patched"
            if role not in trees or (unit in done and wanted is None):
                continue
            if role == "base" and trees["base"] == trees["patched"]:  # its own base: measured once
                continue
            if wanted is None and phase == "local-vs-te":
                continue
            if wanted is not None and unit not in wanted and phase not in wanted:
                continue
            pick.append(unit)
        if pick:
            argv = _argv(line, python) + ["--only", ",".join(pick)]
            estimate = START_S + sum(ESTIMATE.get(u, 40) for u in pick)
            name = f"{line.key}:{'+'.join(pick)}"
            jobs.append(fleet.Job(name, argv, key=line.key, estimate=estimate))
    return jobs


def dist_job(
    spec: str, out: Path, work: Path, python: str, budget: Optional[float] = None
) -> fleet.Job:
    """``V:N``: the multi-GPU cases of V on N GPUs, patched and vanilla (``budget``: seconds
    after which it starts no case)."""
    version, _, nproc = spec.partition(":")
    trees = stage(version, None, work)
    argv = [python, "-m", "mla_seam.suite", "--nproc", nproc or "2"]
    argv += ["--megatron", str(trees["patched"]), "--vanilla-megatron", str(trees["vanilla"])]
    argv += ["--out", str(out)]
    if budget is not None:
        argv += ["--time-budget-s", str(int(budget))]
    return fleet.Job(f"dist {version} x{nproc}", argv, gpus=int(nproc or 2), estimate=DIST_S)


def run_lines(
    lines: Sequence[Line],
    gpus: Sequence[int],
    logs: Path,
    device: DeviceInfo,
    *,
    deadline_s: Optional[float] = None,
    extra_jobs: Sequence[fleet.Job] = (),
    python: Optional[str] = None,
    say: Callable[[str], None] = lambda text: None,
) -> List[LineOutcome]:
    """Run the lines' suites over ``gpus``; each line's outcome names its results folder.

    Args:
        lines: The suites, in the order their processes should start (after ``extra_jobs``).
        gpus: Device indices to hand out (at least one).
        logs: Folder for each process's output.
        device: The host's card (its slug names the results folders; one kind of card a host).
        deadline_s: Seconds from now after which nothing starts (and what runs is killed).
        extra_jobs: Processes to start first (the multi-GPU phase: :func:`dist_job`).
        python: Interpreter of the suite processes (default: this one).
        say: Where progress lines go (a log file, stdout).
    """
    python = python or sys.executable
    end = None if deadline_s is None else time.monotonic() + deadline_s
    folders = [results_folder(line.out, line.tag, device.slug) for line in lines]
    per_line = [line_jobs(line, folder, python) for line, folder in zip(lines, folders)]
    jobs = list(extra_jobs) + [job for found in per_line for job in found]
    say(f"{len(jobs)} jobs, {sum(j.estimate * j.gpus for j in jobs):.0f} GPU-s estimated")
    left = None if end is None else end - time.monotonic()
    for job in fleet.run_jobs(jobs, gpus, logs, deadline_s=left):
        done = f"rc={job.rc} {job.seconds:.0f}s" if job.outcome == "ran" else job.outcome
        say(f"{done} (est {job.estimate:.0f}s) {job.name}")
    return [
        LineOutcome(line, folder, found, sorted(done_units(folder)))
        for line, folder, found in zip(lines, folders, per_line)
    ]


def write_summary(outcomes: Sequence[LineOutcome], out: Path) -> Dict[str, List[str]]:
    """``out/run_lines.json``: the units done per results tag; returns it."""
    summary: Dict[str, List[str]] = {}
    for outcome in outcomes:
        tag = outcome.folder.parent.name
        summary[tag] = sorted(set(summary.get(tag, ())) | set(outcome.done))
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
