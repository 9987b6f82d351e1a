"""The ``suite`` verb: run the GPU suite (``tests/gpu``) against a patched Megatron tree.

``mla-seam suite --megatron DIR [--baseline-megatron DIR] [--out DIR] [--only PHASES]
[--update-goldens]``

Each phase is one pytest process inside one Megatron tree (``MLA_SEAM_MEGATRON_TREE``; Megatron
cannot be imported twice in one interpreter): smoke, oracles, matrix, golden and bench on the
patched tree (``--megatron``), and bench again on the vanilla baseline (``--baseline-megatron``,
the same release without the series) so the benchmarks can be put side by side: both run in one
suite run on one card. Tests append JSON lines to ``MLA_SEAM_RESULTS``; the suite collects them
and writes ``<out>/<tag>/<card>/``:

* ``results.json``: everything (schema :data:`SCHEMA_VERSION`, see ``results/README.md``);
* ``results.md``: the same for people;
* ``golden_values_<card>_te<TE>.json``: loss and grad norm per step of a tiny MLA GPT in
  Megatron's golden-values schema. Within one tag the check is exact: an existing file is the
  reference (a mismatch fails the run and is written beside it as ``*.observed.json``;
  ``--update-goldens`` replaces it). Across tags (other ``<out>/<tag>/<card>/`` folders with the
  same TE version) the differences are reported, never asserted;
* ``bench.json``: benchmark records and their summary against the issue's goals (recorded,
  never asserted).

``--only PHASES`` runs a subset and merges it into an existing ``results.json`` of the same tag,
card, torch and TE (the lent device allows 10 minutes per command: run smoke,oracles,matrix in
one call and golden,bench,bench-baseline in the next).

Without a visible CUDA device the verb raises :class:`~mla_seam.errors.DeviceError` (exit 18)
before running anything. Multi-GPU phases (TP/PP/CP via torchrun) are not built yet; the results
schema already carries ``world_size`` and the parallel layout for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mla_seam import __version__, releases
from mla_seam.errors import DeviceError, NotMegatronTreeError, TreeNotFoundError, UsageError
from mla_seam.paths import ADAPTER_RELPATH

log = logging.getLogger(__name__)

#: Version of results.json / bench.json. Bump on any incompatible change (README says how).
SCHEMA_VERSION = 1
#: Golden-values metrics, named as Megatron's functional tests name theirs.
GOLDEN_METRICS = ("lm loss", "grad norm")

#: Goals of issue #4 (recorded against, never asserted).
GOALS = {
    "adapter_overhead": 1.005,  # patched / vanilla, same backend, bshd
    "thd_patched_vs_vanilla": 0.6,  # patched / vanilla THD, release lines 0.18+
    "local_vs_te_unfused": 1.2,  # local spec / TE unfused
}
THD_GOAL_FROM = (0, 18)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One pytest process of the suite.

    Attributes:
        name: Phase name (also the records' ``phase``).
        target: Test file, relative to the repository root.
        tree: ``"megatron"`` (patched) or ``"baseline"`` (vanilla).
        timeout_s: Wall-clock limit of the process.
        side: ``MLA_SEAM_SIDE`` of its records.
    """

    name: str
    target: str
    tree: str = "megatron"
    timeout_s: int = 300
    side: str = "patched"


PHASES: Tuple[Phase, ...] = (
    Phase("smoke", "tests/gpu/test_smoke.py", timeout_s=180),
    Phase("oracles", "tests/gpu/test_oracles.py", timeout_s=240),
    Phase("matrix", "tests/gpu/test_matrix.py", timeout_s=360),
    Phase("golden", "tests/gpu/test_golden.py", timeout_s=180),
    Phase("bench", "tests/gpu/bench.py", timeout_s=240),
    Phase("bench-baseline", "tests/gpu/bench.py", tree="baseline", timeout_s=240, side="vanilla"),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


# --- device --------------------------------------------------------------------------------------

_PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
except Exception as exc:
    info.update(torch=None, cuda=False, error="torch does not import: %s" % exc)
    print(json.dumps(info)); sys.exit(0)
info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
if info["cuda"]:
    info.update(
        device_count=torch.cuda.device_count(),
        name=torch.cuda.get_device_name(0),
        capability=list(torch.cuda.get_device_capability(0)),
        memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        cudnn=torch.backends.cudnn.version(),
    )
try:
    import transformer_engine
    info["te"] = str(getattr(transformer_engine, "__version__", "unknown"))
except Exception as exc:
    info["te"] = None
    info["te_error"] = str(exc)[:200]
try:
    import transformers
    info["transformers"] = transformers.__version__
except Exception:
    info["transformers"] = None
print(json.dumps(info))
"""


@dataclasses.dataclass
class DeviceInfo:
    """What the suite ran on (filled by :func:`probe_device`)."""

    python: str
    torch: Optional[str]
    cuda: bool
    cuda_build: Optional[str] = None
    device_count: int = 0
    name: Optional[str] = None
    capability: Optional[List[int]] = None
    memory_gib: Optional[float] = None
    cudnn: Optional[int] = None
    te: Optional[str] = None
    transformers: Optional[str] = None
    error: Optional[str] = None
    te_error: Optional[str] = None

    @property
    def slug(self) -> str:
        """Short card name for file names (``h100``, ``h200``, ...)."""
        return card_slug(self.name or "cpu")

    def as_dict(self) -> Dict[str, Any]:
        """JSON form, with the slug."""
        data = dataclasses.asdict(self)
        data["slug"] = self.slug
        return data


def card_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; other names: lower-case alphanumerics."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper().replace("NVIDIA", ""))
    if match:
        return match.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def probe_device(python: str) -> DeviceInfo:
    """Ask ``python`` (the interpreter the tests will use) what device and libraries it sees."""
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return DeviceInfo(python="?", torch=None, cuda=False, error=f"probe failed: {exc}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        err = (proc.stderr or proc.stdout).strip()[-300:]
        return DeviceInfo(python="?", torch=None, cuda=False, error=f"probe failed: {err}")
    data = json.loads(lines[-1])
    fields = {f.name for f in dataclasses.fields(DeviceInfo)}
    return DeviceInfo(**{k: v for k, v in data.items() if k in fields})


def require_gpu(info: DeviceInfo) -> None:
    """Raise :class:`DeviceError` unless a CUDA device is visible.

    Raises:
        DeviceError: No CUDA device (or torch does not import).
    """
    if info.cuda:
        return
    if info.torch is None:
        what = info.error or "torch does not import"
    else:
        what = f"torch {info.torch} (CUDA build: {info.cuda_build or 'none'}) sees no CUDA device"
    raise DeviceError(
        f"the GPU suite needs a CUDA device: {what}",
        "run it on a machine with an NVIDIA GPU and a CUDA build of torch (check "
        "CUDA_VISIBLE_DEVICES and nvidia-smi); the CPU-runnable parts run with "
        "MLA_SEAM_MEGATRON_TREE=DIR pytest tests/gpu/test_oracles.py",
    )


# --- trees ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeInfo:
    """A Megatron tree the suite runs in."""

    path: str
    version: str
    tag: str
    patched: bool

    def as_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


def inspect_tree(path: os.PathLike, role: str) -> TreeInfo:
    """Version and patched state of a Megatron tree.

    Raises:
        TreeNotFoundError: ``path`` is not a directory.
        NotMegatronTreeError: it holds no ``megatron/core`` (or no readable version).
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise TreeNotFoundError(f"{role} {path} is not a directory", "pass a Megatron checkout")
    if not (root / "megatron" / "core").is_dir():
        raise NotMegatronTreeError(
            f"{role} {root} holds no megatron/core package", "pass the Megatron-LM checkout root"
        )
    version = read_version(root)
    patched = (root / ADAPTER_RELPATH).is_file()
    return TreeInfo(str(root), version, releases.tag_of(version), patched)


def read_version(root: Path) -> str:
    """The tree's megatron-core version (:func:`mla_seam.releases.read_version`).

    Raises:
        NotMegatronTreeError: The file is missing or defines no version numbers.
    """
    try:
        return releases.read_version(root)
    except releases.VersionNotFound as exc:
        raise NotMegatronTreeError(str(exc), "pass a megatron-core tree") from None


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


# --- golden values -------------------------------------------------------------------------------


def golden_document(
    metrics: Mapping[str, Sequence[float]], start_step: int = 1, step_interval: int = 1
) -> Dict[str, Dict[str, Any]]:
    """Megatron's golden-values JSON: ``{metric: {start_step, end_step, step_interval, values}}``.

    Args:
        metrics: Per metric, one value per recorded step.
        start_step: Step of the first value (Megatron counts from 1).
        step_interval: Steps between values.

    Returns:
        The document; ``values`` maps the step (a string, as in Megatron's files) to the value.
    """
    doc: Dict[str, Dict[str, Any]] = {}
    for name, values in metrics.items():
        values = [float(v) for v in values]
        steps = [start_step + i * step_interval for i in range(len(values))]
        doc[name] = {
            "start_step": start_step,
            "end_step": steps[-1] if steps else start_step,
            "step_interval": step_interval,
            "values": {str(s): v for s, v in zip(steps, values)},
        }
    return doc


def validate_golden(doc: Any) -> None:
    """Raise ``ValueError`` unless ``doc`` follows the golden-values schema."""
    if not isinstance(doc, dict) or not doc:
        raise ValueError("golden values: expected a non-empty object of metrics")
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise ValueError(f"golden values: {name!r} is not an object")
        for key in ("start_step", "end_step", "step_interval", "values"):
            if key not in entry:
                raise ValueError(f"golden values: {name!r} lacks {key!r}")
        steps = sorted(int(s) for s in entry["values"])
        expected = list(range(entry["start_step"], entry["end_step"] + 1, entry["step_interval"]))
        if steps != expected:
            raise ValueError(
                f"golden values: {name!r} steps {steps[:5]}... do not match start/end/interval"
            )
        for step, value in entry["values"].items():
            if not isinstance(value, (int, float)) and value != "nan":
                raise ValueError(f"golden values: {name!r} step {step} is not a number")


def read_golden(path: os.PathLike) -> Dict[str, Dict[str, Any]]:
    """Load and validate a golden-values file."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_golden(doc)
    return doc


def write_golden(path: os.PathLike, doc: Mapping[str, Any]) -> None:
    """Write a golden-values file (validated; metrics by name, steps in numeric order)."""
    validate_golden(doc)
    ordered = {}
    for name in sorted(doc):
        entry = doc[name]
        ordered[name] = {
            "start_step": entry["start_step"],
            "end_step": entry["end_step"],
            "step_interval": entry["step_interval"],
            "values": {k: entry["values"][k] for k in sorted(entry["values"], key=int)},
        }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")


def _steps(entry: Mapping[str, Any]) -> Dict[int, float]:
    return {int(k): float(v) for k, v in entry["values"].items()}


def compare_golden_exact(observed: Mapping[str, Any], reference: Mapping[str, Any]) -> List[str]:
    """Every difference between two golden documents, bit for bit (empty list: identical)."""
    problems = []
    for name in sorted(set(observed) | set(reference)):
        if name not in observed or name not in reference:
            problems.append(f"{name}: only in {'observed' if name in observed else 'reference'}")
            continue
        got, want = _steps(observed[name]), _steps(reference[name])
        if sorted(got) != sorted(want):
            problems.append(f"{name}: steps differ ({len(got)} observed vs {len(want)} expected)")
            continue
        for step in sorted(want):
            a, b = got[step], want[step]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                problems.append(f"{name} step {step}: {a!r} != {b!r}")
    return problems


def compare_golden_cross(
    observed: Mapping[str, Any], other: Mapping[str, Any]
) -> Dict[str, Dict[str, Any]]:
    """Per metric: how far ``observed`` is from ``other`` (another tag) on the common steps."""
    summary: Dict[str, Dict[str, Any]] = {}
    for name in sorted(set(observed) & set(other)):
        got, want = _steps(observed[name]), _steps(other[name])
        common = sorted(set(got) & set(want))
        diffs = [(s, got[s] - want[s]) for s in common]
        first = next((s for s, d in diffs if d != 0), None)
        max_abs = max((abs(d) for _, d in diffs), default=0.0)
        max_rel = max((abs(d) / max(abs(want[s]), 1e-30) for s, d in diffs), default=0.0)
        summary[name] = {
            "steps_compared": len(common),
            "identical": first is None,
            "first_different_step": first,
            "max_abs_diff": max_abs,
            "max_rel_diff": max_rel,
            "last_step_values": [got[common[-1]], want[common[-1]]] if common else None,
        }
    return summary


def golden_filename(slug: str, te_version: Optional[str]) -> str:
    """``golden_values_<card>_te<TE>.json`` (``te-none`` without Transformer Engine)."""
    te = re.sub(r"[^0-9A-Za-z.+-]", "_", te_version) if te_version else "-none"
    return f"golden_values_{slug}_te{te}.json"


# --- running phases ------------------------------------------------------------------------------


@dataclasses.dataclass
class PhaseResult:
    """Outcome of one pytest process."""

    name: str
    tree: str
    exit_code: Optional[int]
    seconds: float
    counts: Dict[str, int]
    timed_out: bool = False
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        """Passed: pytest exit 0 (5, nothing collected, counts as not run)."""
        return self.exit_code == 0 and not self.timed_out

    def as_dict(self) -> Dict[str, Any]:
        """JSON form."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data


def parse_junit(path: os.PathLike) -> Dict[str, int]:
    """Test counts from a pytest JUnit XML file (xfail/xpass told apart from skips)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for case in root.iter("testcase"):
        if case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["errors"] += 1
        elif (skipped := case.find("skipped")) is not None:
            kind = skipped.get("type", "")
            counts["xfailed" if "xfail" in kind else "skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def free_port() -> int:
    """A free TCP port on the loopback interface (MASTER_PORT of one phase)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_phase(
    phase: Phase,
    tree: TreeInfo,
    python: str,
    repo: Path,
    work: Path,
    extra_env: Optional[Mapping[str, str]] = None,
    pytest_args: Sequence[str] = (),
) -> Tuple[PhaseResult, List[Dict[str, Any]]]:
    """Run one phase's pytest process; return its result and its records.

    Args:
        phase: The phase.
        tree: The Megatron tree it runs in.
        python: Interpreter.
        repo: mla-seam repository root (holds ``tests/``).
        work: Scratch folder for the records and JUnit files.
        extra_env: Further environment variables.
        pytest_args: Extra pytest arguments (e.g. ``-k``).
    """
    results = work / f"{phase.name}.jsonl"
    junit = work / f"{phase.name}.xml"
    env = dict(os.environ)
    env.update(
        MLA_SEAM_MEGATRON_TREE=tree.path,
        MLA_SEAM_RESULTS=str(results),
        MLA_SEAM_SIDE=phase.side,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
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
        f"--confcutdir={(repo / phase.target).parent}",
        *pytest_args,
    ]
    log.info("mla-seam suite: %s (%s) ...", phase.name, tree.tag)
    start = time.monotonic()
    timed_out, code, tail = False, None, ""
    try:
        proc = subprocess.run(
            cmd,
            cwd=repo,
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
    result = PhaseResult(phase.name, phase.tree, code, seconds, parse_junit(junit), timed_out, tail)
    records = read_records(results, phase.name)
    log.info(
        "mla-seam suite: %s %s in %.0f s %s",
        phase.name,
        "ok" if result.ok else f"FAILED (exit {code}{', timeout' if timed_out else ''})",
        seconds,
        result.counts,
    )
    return result, records


def read_records(path: os.PathLike, phase: str) -> List[Dict[str, Any]]:
    """JSON lines of one phase, each tagged with ``phase`` (unreadable lines are reported)."""
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
        records.append(record)
    return records


# --- benchmark summary ---------------------------------------------------------------------------


def _key(record: Mapping[str, Any]) -> Tuple[str, str, str, str]:
    return (
        str(record.get("spec")),
        str(record.get("backend")),
        str(record.get("layout")),
        str(record.get("dims", "v2lite")),
    )


def summarize_bench(records: Iterable[Mapping[str, Any]], version: str) -> Dict[str, Any]:
    """Side-by-side ratios and the backend table from ``bench_layer`` / ``bench_matmul`` records.

    Args:
        records: All records of the run.
        version: The patched tree's megatron-core version (the THD goal applies from 0.18).

    Returns:
        ``{"matmul_tflops", "adapter_overhead", "thd_patched_vs_vanilla", "backend_table",
        "local_vs_te_unfused"}``; each comparison carries its goal and whether it was met.
    """
    records = list(records)
    layers = [r for r in records if r.get("case") == "bench_layer" and r.get("ms_median")]
    matmul = [r for r in records if r.get("case") == "bench_matmul" and r.get("tflops")]
    patched = {_key(r): r for r in layers if r.get("side") == "patched"}
    vanilla = {_key(r): r for r in layers if r.get("side") == "vanilla"}
    peak = max((float(r["tflops"]) for r in matmul), default=None)

    def pair(key, goal_name, goal_applies=True):
        ours, theirs = patched[key], vanilla[key]
        ratio = ours["ms_median"] / theirs["ms_median"]
        goal = GOALS[goal_name]
        return {
            "spec": key[0],
            "backend": key[1],
            "layout": key[2],
            "dims": key[3],
            "patched_ms": ours["ms_median"],
            "vanilla_ms": theirs["ms_median"],
            "ratio": round(ratio, 4),
            "goal": goal if goal_applies else None,
            "met": (ratio <= goal) if goal_applies else None,
        }

    common = sorted(set(patched) & set(vanilla))
    thd_applies = _version_tuple(version)[:2] >= THD_GOAL_FROM
    overhead = [pair(k, "adapter_overhead") for k in common if k[2] == "bshd"]
    thd = [pair(k, "thd_patched_vs_vanilla", thd_applies) for k in common if k[2] != "bshd"]
    table = []
    for key in sorted(patched):
        r = patched[key]
        tflops = r.get("tflops")
        table.append(
            {
                "spec": key[0],
                "backend": key[1],
                "layout": key[2],
                "dims": key[3],
                "decided": r.get("decided"),
                "ms": r["ms_median"],
                "tflops": tflops,
                "fraction_of_matmul": (round(tflops / peak, 4) if tflops and peak else None),
            }
        )
    local_vs_te = []
    for key, r in sorted(patched.items()):
        if key[0] != "local":
            continue
        te_key = ("te", "unfused", key[2], key[3])
        if te_key in patched:
            ratio = r["ms_median"] / patched[te_key]["ms_median"]
            goal = GOALS["local_vs_te_unfused"]
            local_vs_te.append(
                {
                    "layout": key[2],
                    "dims": key[3],
                    "local_ms": r["ms_median"],
                    "te_unfused_ms": patched[te_key]["ms_median"],
                    "ratio": round(ratio, 4),
                    "goal": goal,
                    "met": ratio <= goal,
                }
            )
    return {
        "matmul_tflops": peak,
        "adapter_overhead": overhead,
        "thd_patched_vs_vanilla": thd,
        "thd_goal_applies": thd_applies,
        "backend_table": table,
        "local_vs_te_unfused": local_vs_te,
    }


# --- aggregation ---------------------------------------------------------------------------------


def summarize_cases(records: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts per record case and the distinct upstream-drift notes."""
    counts: Dict[str, int] = {}
    notes: Dict[str, int] = {}
    for record in records:
        case = str(record.get("case", "?"))
        counts[case] = counts.get(case, 0) + 1
        for note in record.get("notes") or record.get("drift") or []:
            notes[note] = notes.get(note, 0) + 1
    return {"record_counts": counts, "upstream_drift": sorted(notes)}


def build_results(
    *,
    tree: TreeInfo,
    baseline: Optional[TreeInfo],
    device: DeviceInfo,
    phases: Sequence[PhaseResult],
    records: Sequence[Mapping[str, Any]],
    golden: Mapping[str, Any],
    bench: Mapping[str, Any],
    started: str,
    seconds: float,
) -> Dict[str, Any]:
    """The ``results.json`` document (schema :data:`SCHEMA_VERSION`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mla-seam-gpu-suite",
        "mla_seam_version": __version__,
        "started": started,
        "seconds": round(seconds, 1),
        "tag": tree.tag,
        "megatron": tree.as_dict(),
        "baseline": baseline.as_dict() if baseline else None,
        "environment": {
            "card": device.name,
            "card_slug": device.slug,
            "compute_capability": device.capability,
            "device_count": device.device_count,
            "memory_gib": device.memory_gib,
            "torch": device.torch,
            "cuda": device.cuda_build,
            "cudnn": device.cudnn,
            "transformer_engine": device.te,
            "transformers": device.transformers,
            "python": device.python,
        },
        "parallel": {
            "world_size": 1,
            "tensor_model_parallel": 1,
            "pipeline_model_parallel": 1,
            "virtual_pipeline_model_parallel": None,
            "context_parallel": 1,
            "expert_model_parallel": 1,
        },
        "ok": all(p.ok for p in phases) and golden.get("status") not in ("mismatch",),
        "phases": [p.as_dict() for p in phases],
        "summary": summarize_cases(records),
        "golden": dict(golden),
        "bench_summary": dict(bench),
        "records": list(records),
    }


# --- markdown ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _worst(diffs: Optional[Mapping[str, float]], grads: bool) -> Optional[float]:
    if not diffs:
        return None
    values = [v for k, v in diffs.items() if (k != "out") == grads]
    return max(values) if values else None


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the run for people (versions, phases, oracles, matrix, golden, bench)."""
    env = results["environment"]
    lines = [
        f"# mla-seam GPU suite: {results['tag']} on {env.get('card') or '?'}",
        "",
        f"Overall: **{'PASS' if results['ok'] else 'FAIL'}** "
        f"({results['seconds']} s, started {results['started']}, schema "
        f"{results['schema_version']}).",
        "",
    ]
    base = results.get("baseline")
    lines += _table(
        ["what", "version"],
        [
            ["Megatron (patched)", f"{results['megatron']['tag']} ({results['megatron']['path']})"],
            ["Megatron baseline (vanilla)", base and f"{base['tag']} ({base['path']})"],
            [
                "card",
                f"{env.get('card')} sm{''.join(map(str, env.get('compute_capability') or []))}",
            ],
            ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
            ["cuDNN", env.get("cudnn")],
            ["Transformer Engine", env.get("transformer_engine")],
            ["HF transformers", env.get("transformers")],
            ["Python", env.get("python")],
            ["parallel", "world size 1 (TP=PP=CP=EP=1)"],
        ],
    )
    lines += ["", "## Phases", ""]
    lines += _table(
        ["phase", "tree", "ok", "passed", "failed", "errors", "skipped", "xfailed", "s"],
        [
            [
                p["name"],
                p["tree"],
                p["ok"],
                p["counts"].get("passed"),
                p["counts"].get("failed"),
                p["counts"].get("errors"),
                p["counts"].get("skipped"),
                p["counts"].get("xfailed"),
                p["seconds"],
            ]
            for p in results["phases"]
        ],
    )
    drift = results["summary"].get("upstream_drift") or []
    if drift:
        lines += ["", "## Upstream structure drift (not the adapter's)", ""]
        lines += [f"- {note}" for note in drift]
    records = results["records"]
    oracle = [r for r in records if r.get("case") in ("oracle_megatron", "oracle_thd")]
    if oracle:
        lines += ["", "## Oracles (max |diff| / max |ref|, float64 oracles)", ""]
        lines += _table(
            [
                "case",
                "spec",
                "dims",
                "rope",
                "dtype",
                "out vs ref",
                "grads vs ref",
                "out vs HF",
                "grads vs HF",
            ],
            [
                [
                    r["case"],
                    r.get("spec"),
                    r.get("dims", "v2lite"),
                    r.get("rope", "yarn"),
                    r.get("dtype", "float32"),
                    (r.get("max_rel_vs_reference") or {}).get("out"),
                    _worst(r.get("max_rel_vs_reference"), True),
                    (r.get("max_rel_vs_hf") or {}).get("out"),
                    _worst(r.get("max_rel_vs_hf"), True),
                ]
                for r in oracle
            ],
        )
    matrix = [r for r in records if r.get("case") == "matrix"]
    if matrix:
        lines += ["", "## Matrix", ""]
        lines += _table(
            [
                "spec",
                "backend",
                "layout",
                "dims",
                "rope",
                "recompute",
                "outcome",
                "decided",
                "out vs ref",
                "grads vs ref",
                "THD vs bshd",
                "checks",
            ],
            [
                [
                    r.get("spec"),
                    r.get("backend"),
                    r.get("layout"),
                    r.get("dims"),
                    r.get("rope"),
                    r.get("recompute"),
                    r.get("outcome"),
                    r.get("decided") or (r.get("message") or "")[:80],
                    (r.get("max_rel_vs_reference") or {}).get("out"),
                    _worst(r.get("max_rel_vs_reference"), True),
                    max((r.get("thd_vs_bshd") or {"-": None}).values(), key=lambda v: v or 0),
                    ", ".join(k for k, ok in (r.get("checks") or {}).items() if not ok) or "ok",
                ]
                for r in matrix
            ],
        )
    golden = results.get("golden") or {}
    lines += ["", "## Golden values", ""]
    lines.append(f"- file: `{golden.get('file')}`; status: **{golden.get('status')}**")
    for problem in (golden.get("problems") or [])[:10]:
        lines.append(f"  - {problem}")
    for tag, summary in sorted((golden.get("cross_tag") or {}).items()):
        for metric, s in summary.items():
            lines.append(
                f"- vs {tag} `{metric}`: identical={_fmt(s['identical'])}, first different "
                f"step {_fmt(s['first_different_step'])}, max abs diff {_fmt(s['max_abs_diff'])}"
                f", max rel diff {_fmt(s['max_rel_diff'])}"
            )
    bench = results.get("bench_summary") or {}
    if bench:
        lines += ["", "## Benchmarks (recorded, not asserted; median of N, CUDA events)", ""]
        lines.append(f"- measured bf16 matmul rate: {_fmt(bench.get('matmul_tflops'))} TFLOP/s")
        for name, title in (
            ("adapter_overhead", "Adapter overhead, patched / vanilla (goal <= 1.005)"),
            ("thd_patched_vs_vanilla", "THD patched / vanilla (goal <= 0.6 on 0.18+)"),
        ):
            rows = bench.get(name) or []
            if rows:
                lines += ["", f"### {title}", ""]
                lines += _table(
                    [
                        "spec",
                        "backend",
                        "layout",
                        "patched ms",
                        "vanilla ms",
                        "ratio",
                        "goal",
                        "met",
                    ],
                    [
                        [
                            r["spec"],
                            r["backend"],
                            r["layout"],
                            r["patched_ms"],
                            r["vanilla_ms"],
                            r["ratio"],
                            r["goal"],
                            r["met"],
                        ]
                        for r in rows
                    ],
                )
        if bench.get("backend_table"):
            lines += ["", "### Backends (patched tree)", ""]
            lines += _table(
                ["spec", "backend", "layout", "dims", "decided", "ms", "TFLOP/s", "of matmul"],
                [
                    [
                        r["spec"],
                        r["backend"],
                        r["layout"],
                        r["dims"],
                        r["decided"],
                        r["ms"],
                        r["tflops"],
                        r["fraction_of_matmul"],
                    ]
                    for r in bench["backend_table"]
                ],
            )
        if bench.get("local_vs_te_unfused"):
            lines += ["", "### Local spec / TE unfused (goal <= 1.2)", ""]
            lines += _table(
                ["layout", "local ms", "TE unfused ms", "ratio", "met"],
                [
                    [r["layout"], r["local_ms"], r["te_unfused_ms"], r["ratio"], r["met"]]
                    for r in bench["local_vs_te_unfused"]
                ],
            )
    failed = [p for p in results["phases"] if not p["ok"]]
    if failed:
        lines += ["", "## Failed phases (output tail)", ""]
        for p in failed:
            lines += [f"### {p['name']}", "", "```", p.get("output_tail", "")[-2500:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- the verb ------------------------------------------------------------------------------------


def _default_out() -> Path:
    from mla_seam import paths  # pylint: disable=import-outside-toplevel

    try:
        return paths.bundle_root() / "results"
    except Exception:  # pylint: disable=broad-except
        return Path.cwd() / "results"


def _repo_root() -> Path:
    from mla_seam import paths  # pylint: disable=import-outside-toplevel

    return paths.bundle_root()


def _golden_phase(
    out_dir: Path, device: DeviceInfo, work: Path, other_tags: Path, tag: str, update: bool
) -> Tuple[Dict[str, str], Callable[[], Dict[str, Any]]]:
    """Environment for the golden phase and a function that settles the files after it."""
    name = golden_filename(device.slug, device.te)
    committed = out_dir / name
    observed = work / name
    env = {
        "MLA_SEAM_GOLDEN_OUT": str(observed),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    }
    if committed.is_file() and not update:
        env["MLA_SEAM_GOLDEN_REF"] = str(committed)

    def settle() -> Dict[str, Any]:
        info: Dict[str, Any] = {"file": name}
        if not observed.is_file():
            info["status"] = "not recorded"
            return info
        doc = read_golden(observed)
        if committed.is_file() and not update:
            problems = compare_golden_exact(doc, read_golden(committed))
            info["problems"] = problems
            if problems:
                info["status"] = "mismatch"
                write_golden(committed.with_suffix(".observed.json"), doc)
            else:
                info["status"] = "matched"
        else:
            info["status"] = "updated" if committed.is_file() else "recorded"
            write_golden(committed, doc)
        cross = {}
        for path in sorted(other_tags.glob(f"*/{device.slug}/{name}")):
            other_tag = path.parent.parent.name
            if other_tag == tag:
                continue
            try:
                cross[other_tag] = compare_golden_cross(doc, read_golden(path))
            except (OSError, ValueError) as exc:
                cross[other_tag] = {"error": {"message": str(exc)}}
        info["cross_tag"] = cross
        return info

    return env, settle


def run_suite(
    *,
    megatron: os.PathLike,
    baseline: Optional[os.PathLike] = None,
    out: Optional[os.PathLike] = None,
    only: Optional[Sequence[str]] = None,
    update_goldens: bool = False,
    python: Optional[str] = None,
    pytest_args: Sequence[str] = (),
    device: Optional[DeviceInfo] = None,
    runner: Callable[..., Tuple[PhaseResult, List[Dict[str, Any]]]] = run_phase,
) -> Tuple[Dict[str, Any], Path]:
    """Run the suite and write its results; returns ``(results, folder)``.

    ``device`` and ``runner`` exist for tests (a probed device, and a phase runner that does
    not start pytest).

    Raises:
        DeviceError: No CUDA device visible.
        UsageError: Unknown phase in ``only``; the baseline tree is patched.
    """
    python = python or sys.executable
    tree = inspect_tree(megatron, "--megatron")
    if not tree.patched:
        log.warning(
            "mla-seam suite: %s has no %s; it is not patched (run `mla-seam apply` first)",
            tree.path,
            ADAPTER_RELPATH,
        )
    base = inspect_tree(baseline, "--baseline-megatron") if baseline else None
    if base and base.patched:
        raise UsageError(
            f"--baseline-megatron {base.path} carries the adapter ({ADAPTER_RELPATH})",
            "pass the vanilla tree of the same release (mla-seam upstream get --into DIR)",
        )
    if base and base.version != tree.version:
        log.warning(
            "mla-seam suite: baseline %s is not the patched tree's release %s; the side-by-side "
            "numbers compare two releases",
            base.tag,
            tree.tag,
        )
    selected = list(only or PHASE_NAMES)
    unknown = sorted(set(selected) - set(PHASE_NAMES))
    if unknown:
        raise UsageError(f"unknown phase(s) {unknown}", f"choose from {', '.join(PHASE_NAMES)}")
    device = device or probe_device(python)
    require_gpu(device)

    root_out = Path(out) if out else _default_out()
    out_dir = root_out / tree.tag / device.slug
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = _repo_root()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    phases: List[PhaseResult] = []
    records: List[Dict[str, Any]] = []
    golden: Dict[str, Any] = {"status": "not run"}
    with tempfile.TemporaryDirectory(prefix="mla-seam-suite-") as tmp:
        work = Path(tmp)
        for phase in PHASES:
            if phase.name not in selected:
                continue
            if phase.tree == "baseline" and base is None:
                log.info("mla-seam suite: %s skipped (no --baseline-megatron)", phase.name)
                continue
            env: Dict[str, str] = {}
            settle = None
            if phase.name == "golden":
                env, settle = _golden_phase(
                    out_dir, device, work, root_out, tree.tag, update_goldens
                )
            result, recs = runner(
                phase,
                base if phase.tree == "baseline" else tree,
                python,
                repo,
                work,
                extra_env=env,
                pytest_args=pytest_args,
            )
            phases.append(result)
            records.extend(recs)
            if settle is not None:
                golden = settle()
    merged_from = None
    if only:
        previous = load_previous(out_dir / "results.json", tree, device)
        if previous is not None:
            phases, records, golden = merge_previous(previous, phases, records, golden)
            merged_from = previous.get("started")
    bench = summarize_bench(records, tree.version)
    results = build_results(
        tree=tree,
        baseline=base,
        device=device,
        phases=phases,
        records=records,
        golden=golden,
        bench=bench,
        started=started,
        seconds=time.monotonic() - t0,
    )
    results["merged_from"] = merged_from
    write_outputs(out_dir, results)
    return results, out_dir


def load_previous(path: Path, tree: TreeInfo, device: DeviceInfo) -> Optional[Dict[str, Any]]:
    """An earlier ``results.json`` of the same tag, card and software, or ``None``.

    ``--only`` runs (the device allows 10 minutes per command) add their phases to it.
    """
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    env = previous.get("environment") or {}
    same = (
        previous.get("schema_version") == SCHEMA_VERSION
        and previous.get("tag") == tree.tag
        and env.get("card") == device.name
        and env.get("torch") == device.torch
        and env.get("transformer_engine") == device.te
    )
    if not same:
        log.info("mla-seam suite: %s is from another setup; not merged", path)
        return None
    return previous


def merge_previous(
    previous: Mapping[str, Any],
    phases: List[PhaseResult],
    records: List[Dict[str, Any]],
    golden: Dict[str, Any],
) -> Tuple[List[PhaseResult], List[Dict[str, Any]], Dict[str, Any]]:
    """Keep the earlier run's phases (and their records) that this run did not repeat."""
    ran = {p.name for p in phases}
    kept = []
    for p in previous.get("phases") or []:
        if p.get("name") in ran:
            continue
        fields = {f.name for f in dataclasses.fields(PhaseResult)}
        kept.append(PhaseResult(**{k: v for k, v in p.items() if k in fields}))
    order = {name: i for i, name in enumerate(PHASE_NAMES)}
    merged = sorted(kept + phases, key=lambda p: order.get(p.name, len(order)))
    old_records = [r for r in previous.get("records") or [] if r.get("phase") not in ran]
    if "golden" not in ran and previous.get("golden"):
        golden = dict(previous["golden"])
    return merged, old_records + records, golden


def write_outputs(out_dir: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``bench.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps(results, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    (out_dir / "results.md").write_text(render_markdown(results), encoding="utf-8")
    bench_doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "mla-seam-gpu-bench",
        "tag": results["tag"],
        "baseline": results.get("baseline"),
        "environment": results["environment"],
        "parallel": results["parallel"],
        "summary": results["bench_summary"],
        "records": [r for r in results["records"] if str(r.get("case", "")).startswith("bench")],
    }
    (out_dir / "bench.json").write_text(
        json.dumps(bench_doc, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )


def run(args: argparse.Namespace) -> int:
    """The ``suite`` verb; exit 0 when every phase passed and the golden values matched."""
    results, out_dir = run_suite(
        megatron=args.megatron,
        baseline=args.baseline_megatron,
        out=args.out,
        only=args.only.split(",") if args.only else None,
        update_goldens=args.update_goldens,
        python=args.python,
        pytest_args=args.pytest_arg or (),
    )
    sys.stdout.write(f"{out_dir / 'results.md'}\n")
    for phase in results["phases"]:
        sys.stdout.write(
            f"  {phase['name']:<15} {'ok' if phase['ok'] else 'FAILED':<7} {phase['counts']}\n"
        )
    sys.stdout.write(f"  golden          {results['golden'].get('status')}\n")
    return 0 if results["ok"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``suite`` verb to the CLI."""
    parser = subparsers.add_parser(
        "suite",
        help="run the GPU suite (oracles, matrix, goldens, benchmarks) on a patched tree",
        description=(
            "Run tests/gpu against a patched Megatron tree (and the benchmarks against a vanilla "
            "baseline of the same release), one pytest process per phase, and write "
            "<out>/<tag>/<card>/{results.json,results.md,golden_values_*.json,bench.json}. "
            "Needs a CUDA device (exit 18 without one)."
        ),
    )
    parser.add_argument("--megatron", required=True, metavar="DIR", help="the patched tree")
    parser.add_argument(
        "--baseline-megatron",
        metavar="DIR",
        help="the vanilla tree of the same release (benchmarks side by side)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="results folder (default: the repository's results/)"
    )
    parser.add_argument(
        "--only", metavar="PHASES", help=f"comma-separated subset of: {','.join(PHASE_NAMES)}"
    )
    parser.add_argument(
        "--update-goldens",
        action="store_true",
        help="replace this tag's golden values with the observed ones instead of comparing",
    )
    parser.add_argument(
        "--python", metavar="EXE", help="interpreter for the tests (default: this one)"
    )
    parser.add_argument(
        "--pytest-arg",
        action="append",
        metavar="ARG",
        help="extra pytest argument for every phase (repeatable), e.g. --pytest-arg=-x",
    )
    parser.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.suite ARGS``: the verb without the CLI's other verbs.

    ``mla-seam suite`` imports every verb (GitPython among their needs); this entry point needs
    only the standard library and the interpreter's torch, for GPU machines without GitPython.
    """
    from mla_seam.errors import SeamError  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="python -m mla_seam.suite")
    sub = parser.add_subparsers(dest="verb")
    register(sub)
    args = parser.parse_args(["suite", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except SeamError as err:
        log.error("mla-seam suite: %s", err)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
