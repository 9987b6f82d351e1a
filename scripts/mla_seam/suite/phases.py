"""The suite's phases: one table row per pytest file, run once per tree role it names.

A phase is one pytest process inside one Megatron tree (``MLA_SEAM_MEGATRON_TREE``; Megatron
cannot be imported twice in one interpreter). :data:`PHASES` is the whole suite; adding a phase
is adding a row (a test file of ``tests/gpu``, the tree roles it runs on, a timeout). A run of a
phase on a role is a *unit*, named ``<phase>`` on the patched tree and ``<phase>@<role>``
elsewhere (``bench@vanilla``); ``--only`` takes phase or unit names.

Tests append JSON lines to ``MLA_SEAM_RESULTS``; :func:`run_phase` tags each with its ``phase``
and ``role`` and collects the per-test outcomes from pytest's JUnit file, which the three-tree
attribution compares across roles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mla_seam.suite.trees import SIDE, TreeInfo

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One pytest file of the suite and the trees it runs in.

    Attributes:
        name: Phase name (the records' ``phase``).
        target: Test file, relative to the GPU tests folder (:func:`mla_seam.paths.gpu_tests_dir`),
            optionally with a pytest node suffix (``bench_issue8.py::test_thd_sweep``).
        roles: Tree roles it runs on, in order (``patched``, ``vanilla``, ``base``).
        timeout_s: Wall-clock limit of one process.
        nproc: Processes (GPUs) per run: 1 runs pytest directly; more is a torchrun phase
            (``mla_seam.suite_dist``), whose results carry the world size and layout.
        optional: The file may be absent from this checkout (a phase another branch adds):
            skipped with that reason instead of failing.
        golden: Its test writes golden values (``MLA_SEAM_GOLDEN_OUT``, see ``goldens``).
        env: Environment of its processes, set before they start (what a library reads once
            at load, like cuBLAS's ``NVIDIA_TF32_OVERRIDE``, cannot be set by the test itself).
    """

    name: str
    target: str
    roles: Tuple[str, ...] = ("patched",)
    timeout_s: int = 300
    nproc: int = 1
    optional: bool = False
    golden: bool = False
    env: Tuple[Tuple[str, str], ...] = ()

    @property
    def file(self) -> str:
        """The test file of :attr:`target`, without a pytest node suffix."""
        return self.target.split("::", 1)[0]


#: The file of the issue-8 measurements (THD sweep, kernel counts, local vs TE).
SWEEP = "bench_issue8.py"

#: The suite. Budget on one H200 (measured 2026-11-27 for the first five rows, patched tree):
#: smoke 21-35 s, oracles 63-69 s, matrix 63-89 s, golden 19-25 s, bench 28-36 s per tree.
PHASES: Tuple[Phase, ...] = (
    Phase("smoke", "test_smoke.py", ("patched", "vanilla"), timeout_s=180),
    Phase("oracles", "test_oracles.py", timeout_s=240),
    Phase("matrix", "test_matrix.py", timeout_s=360),
    Phase("golden", "test_golden.py", ("patched", "vanilla", "base"), timeout_s=180, golden=True),
    Phase("bench", "bench.py", ("patched", "vanilla", "base"), timeout_s=240),
    # Single-GPU measurements of issue #8 (records bench_thd_sweep, parity_hf, kernel_counts,
    # bench_local_vs_te). Measured 2026-11-29 on one H200, per tree: thd-sweep 40-90 s (vanilla
    # 0.19 at 256 sequences is the slow one), kernels 15-25 s, parity 25-30 s.
    Phase(
        "thd-sweep", SWEEP + "::test_thd_sweep", ("patched", "vanilla", "base"), 360, optional=True
    ),
    # HF parity in fp32 with cuBLAS's TF32 off: TE's fp32 GEMMs otherwise run in TF32 (1.41e-3
    # at input RMS 3 on vanilla and patched of every line, 2026-11-29), above the 1e-3 goal.
    # The base runs it too, so a failure all three trees share is told from a new one.
    Phase(
        "parity",
        "test_parity.py",
        ("patched", "vanilla", "base"),
        240,
        optional=True,
        env=(("NVIDIA_TF32_OVERRIDE", "0"),),
    ),
    Phase("kernels", SWEEP + "::test_kernel_counts", ("patched", "vanilla"), 240, optional=True),
    Phase("local-vs-te", SWEEP + "::test_local_vs_te", ("patched",), 240, optional=True),
    # Issue 20: an MLA layer's fwd+bwd captured in a CUDA graph, replays against eager (records
    # graph_step); on vanilla, where upstream's own MLA cannot be captured (skip reasons).
    Phase("graphs", "test_graphs.py", ("patched", "vanilla"), 300, optional=True),
)
PHASE_NAMES = tuple(p.name for p in PHASES)
#: Unit names of schema-1 results and of scripts written before the roles existed.
ALIASES = {"bench-baseline": "bench@vanilla"}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One phase on one tree role."""

    phase: Phase
    role: str

    @property
    def name(self) -> str:
        """``smoke`` (patched) or ``smoke@vanilla``."""
        return unit_name(self.phase.name, self.role)


def unit_name(phase: str, role: str) -> str:
    """``phase`` on the patched tree, ``phase@role`` on the others."""
    return phase if role == "patched" else f"{phase}@{role}"


def select(only: Optional[Sequence[str]], roles: Sequence[str]) -> Tuple[List[Unit], List[str]]:
    """The units to run, in table order, and the names of ``only`` that match nothing.

    Args:
        only: Phase names (every role of the phase) or unit names; ``None``: everything.
        roles: Roles that have a tree in this run.
    """
    wanted = [ALIASES.get(n.strip(), n.strip()) for n in only or () if n.strip()]
    known = set(PHASE_NAMES) | {unit_name(p.name, r) for p in PHASES for r in p.roles}
    unknown = sorted(set(wanted) - known)
    units = []
    for phase in PHASES:
        for role in phase.roles:
            if role not in roles:
                continue
            if only is None or phase.name in wanted or unit_name(phase.name, role) in wanted:
                units.append(Unit(phase, role))
    return units, unknown


@dataclasses.dataclass
class PhaseResult:
    """Outcome of one pytest process (one unit)."""

    name: str
    tree: str
    exit_code: Optional[int]
    seconds: float
    counts: Dict[str, int]
    timed_out: bool = False
    output_tail: str = ""
    role: str = "patched"
    phase: str = ""
    tests: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped_reason: Optional[str] = None
    failures: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.phase = self.phase or self.name.split("@")[0]

    @property
    def ok(self) -> bool:
        """Passed: pytest exit 0 (5, nothing collected, counts as not run); skipped units too."""
        if self.skipped_reason is not None:
            return True
        return self.exit_code == 0 and not self.timed_out

    def as_dict(self) -> Dict[str, Any]:
        """JSON form."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PhaseResult":
        """Inverse of :meth:`as_dict` (unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed")


#: Characters of a failure message kept per test (its first line).
MESSAGE_CHARS = 240


def _junit_outcomes(path: os.PathLike) -> List[Tuple[str, str, str]]:
    """``(file::name, outcome, message)`` per JUnit ``testcase`` (xfail told apart from skip).

    ``message`` is the first line of a failure's or error's message (``""`` otherwise).
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    rows = []
    for case in root.iter("testcase"):
        message = ""
        if (failure := case.find("failure")) is not None:
            outcome, message = "failed", failure.get("message", "")
        elif (error := case.find("error")) is not None:
            outcome, message = "errors", error.get("message", "")
        elif (skipped := case.find("skipped")) is not None:
            outcome = "xfailed" if "xfail" in skipped.get("type", "") else "skipped"
        else:
            outcome = "passed"
        first = (message.strip().splitlines() or [""])[0][:MESSAGE_CHARS]
        rows.append((f"{case.get('classname', '')}::{case.get('name', '')}", outcome, first))
    return rows


def parse_junit_failures(path: os.PathLike) -> Dict[str, str]:
    """Per failed or erroring test (``file::name``): the first line of its message."""
    failures: Dict[str, str] = {}
    for name, outcome, message in _junit_outcomes(path):
        if outcome in ("failed", "errors") and name not in failures:
            failures[name] = message
    return failures


_SUMMARY_LINE = re.compile(
    r"^(?:FAILED|ERROR) (?P<file>[^\s:]+)::(?P<name>\S+)(?: - (?P<msg>.*))?$"
)


def failure_messages(phase: Mapping[str, Any]) -> Dict[str, str]:
    """A stored unit's failure messages: its ``failures``, else its output's summary lines.

    Runs recorded before ``failures`` existed keep pytest's short summary in ``output_tail``
    (``FAILED file.py::test[id] - message``, cut to the terminal's width); those lines are
    matched to the unit's test ids.
    """
    if phase.get("failures"):
        return dict(phase["failures"])
    tests = phase.get("tests") or {}
    found: Dict[str, str] = {}
    for line in str(phase.get("output_tail") or "").splitlines():
        match = _SUMMARY_LINE.match(line.strip())
        if not match:
            continue
        stem = Path(match["file"]).stem
        for test in tests:
            module, _, name = test.partition("::")
            if name == match["name"] and module.split(".")[-1] == stem:
                found[test] = (match["msg"] or "").strip()
    return found


def parse_junit_cases(path: os.PathLike) -> Dict[str, str]:
    """Per test (``file::name``): its outcome, one of :data:`OUTCOMES`.

    A test reported twice (a teardown error after a failure) keeps its first non-pass outcome.
    """
    cases: Dict[str, str] = {}
    for name, outcome, _ in _junit_outcomes(path):
        if cases.get(name, "passed") == "passed":
            cases[name] = outcome
    return cases


def parse_junit(path: os.PathLike) -> Dict[str, int]:
    """Test counts from a pytest JUnit XML file (xfail/xpass told apart from skips)."""
    counts = {k: 0 for k in OUTCOMES}
    for _, outcome, _ in _junit_outcomes(path):
        counts[outcome] += 1
    return counts


def free_port() -> int:
    """A free TCP port on the loopback interface (MASTER_PORT of one phase)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unavailable(unit: Unit, tree: TreeInfo, reason: str) -> PhaseResult:
    """The result of a unit that was not run (its file is absent, a multi-GPU phase on 1 GPU)."""
    log.info("mla-seam suite: %s skipped: %s", unit.name, reason)
    counts = {k: 0 for k in OUTCOMES}
    return PhaseResult(
        unit.name, tree.tag, None, 0.0, counts, role=unit.role, skipped_reason=reason
    )


def run_phase(
    unit: Unit,
    tree: TreeInfo,
    python: str,
    tests_dir: Path,
    work: Path,
    extra_env: Optional[Mapping[str, str]] = None,
    pytest_args: Sequence[str] = (),
) -> Tuple[PhaseResult, List[Dict[str, Any]]]:
    """Run one unit's pytest process; return its result and its records.

    Args:
        unit: The phase and the tree role.
        tree: The Megatron tree it runs in.
        python: Interpreter.
        tests_dir: The GPU tests folder (holds the phase's file and its conftest).
        work: Scratch folder for the records and JUnit files.
        extra_env: Further environment variables.
        pytest_args: Extra pytest arguments (e.g. ``-k``).
    """
    phase = unit.phase
    stem = unit.name.replace("@", "-")
    results = work / f"{stem}.jsonl"
    junit = work / f"{stem}.xml"
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env.update(
        MLA_SEAM_MEGATRON_TREE=tree.path,
        MLA_SEAM_RESULTS=str(results),
        MLA_SEAM_SIDE=SIDE[unit.role],
        MLA_SEAM_ROLE=unit.role,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
        COLUMNS="240",  # pytest's short summary keeps more of each failure message
        PYTHONPATH=package_parent + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(phase.env)
    env.update(extra_env or {})
    cmd = [
        python,
        "-m",
        "pytest",
        phase.target,
        "-q",
        "-rfEsx",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        # Load only the conftest files of the suite's own folder: the repository's top-level
        # conftest needs GitPython, which the GPU machine may not have.
        f"--confcutdir={tests_dir}",
        *pytest_args,
    ]
    log.info("mla-seam suite: %s (%s) ...", unit.name, tree.tag)
    start = time.monotonic()
    timed_out, code, tail = False, None, ""
    try:
        proc = subprocess.run(
            cmd,
            cwd=tests_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=phase.timeout_s,
            check=False,
        )
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        tail = out[-4000:] + f"\n[timed out after {phase.timeout_s} s]"
    seconds = round(time.monotonic() - start, 1)
    result = PhaseResult(
        unit.name,
        tree.tag,
        code,
        seconds,
        parse_junit(junit),
        timed_out,
        tail,
        role=unit.role,
        phase=phase.name,
        tests=parse_junit_cases(junit),
        failures=parse_junit_failures(junit),
    )
    records = read_records(results, phase.name, unit.role)
    log.info(
        "mla-seam suite: %s %s in %.0f s %s",
        unit.name,
        "ok" if result.ok else f"FAILED (exit {code}{', timeout' if timed_out else ''})",
        seconds,
        result.counts,
    )
    return result, records


def read_records(path: os.PathLike, phase: str, role: str = "patched") -> List[Dict[str, Any]]:
    """JSON lines of one unit, each tagged with ``phase`` and ``role`` (bad lines are kept)."""
    records: List[Dict[str, Any]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = {"case": "unreadable_record", "line": number, "text": line[:200]}
        record["phase"] = phase
        record["role"] = role
        records.append(record)
    return records
