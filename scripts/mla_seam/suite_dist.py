"""Multi-GPU phase of the suite: TP, PP with virtual stages and CP against one-GPU references.

``mla-seam suite --nproc N`` (wired through :func:`add_arguments` and :func:`run_from_args`),
or standalone on a GPU machine without the other verbs' needs::

    python -m mla_seam.suite_dist --megatron PATCHED --baseline-megatron VANILLA --nproc 2

Every case (:func:`default_cases`, written for any even N; N=2 is the measured set) runs in
the patched tree and in the vanilla tree of the same release, each in one ``torchrun`` process
group per tree (``tests/gpu/multigpu/dist_worker.py``), each compared inside that process with
a single-GPU reference built from the same seed and weights. Before any process starts the
launcher checks what it can: N against the visible GPUs and NCCL, and every case's layout
against its model (world size, heads for TP and CP all-to-all, layers for PP and virtual
stages with uneven first/last stages, tokens for sequence parallelism, 2*CP dividing every
packed sequence). Each failure is a :class:`~mla_seam.errors.UsageError` (exit 2) or a
:class:`~mla_seam.errors.DeviceError` (exit 18) naming the case and the fix.

Resumable per case: rank 0 journals ``start`` and ``result`` lines under ``state/``; a killed
or timed-out process group loses the case it was in (recorded as ``timeout`` / ``crashed``),
and the launcher starts a new group for the cases after it. A rerun with the same plan skips
finished cases, so a run cut by the device's 10-minute limit continues where it stopped.

Writes ``<out>/<tag>/<card>/multigpu/``: ``results.json`` (the suite's schema, ``kind``
``mla-seam-gpu-suite-multigpu``, ``parallel.world_size`` = N and the layouts),
``results.md``, and per layout a golden-values file in Megatron's schema,
``golden_values_<card>_te<TE>_<layout>.json``: exact within a tag against the committed
file (the first run records it; ``--update-goldens`` replaces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mla_seam import __version__, paths
from mla_seam import suite as _suite
from mla_seam.errors import DeviceError, UsageError
from mla_seam.suite import render as _render
from mla_seam.suite import runner as _runner

log = logging.getLogger(__name__)

KIND = "mla-seam-gpu-suite-multigpu"
WORKER = "tests/gpu/multigpu/dist_worker.py"
SIDES = ("patched", "vanilla")
#: Seconds a torchrun group needs to start (imports, TE, NCCL) on top of its cases' budgets.
STARTUP_S = 120
#: Upstream issues the cases reproduce (not the adapter's business; recorded, never hidden).
ISSUE_1699 = {
    "ref": "NVIDIA/Megatron-LM#1699",
    "expect": "grads",
    "text": "MLA's shared RoPE key (k_pos_emb) gradient is not summed over TP ranks without "
    "sequence parallelism: outputs match TP=1, gradients upstream of it do not",
}
#: Absorbed by H7 (a known issue of the vanilla tree only): the patched tree takes these
#: offsets from the adapter and runs the case against PP=1 like any other.
ZERO_MIDDLE = {
    "ref": "upstream get_transformer_layer_offset",
    "expect": "offset_error",
    "match": "ZeroDivisionError",
    "sides": ["vanilla"],
    "text": "PP=2 with virtual stages and both first and last stage sizes set: upstream "
    "divides by the number of middle stages (0) on the last pipeline rank; the patched tree "
    "asks the adapter first (H7), whose layer_offset places every layer",
}


# --- cases ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout; the world is ``tp * pp * cp`` ranks (no data parallelism)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vp: Optional[int] = None
    sp: bool = False
    first: Optional[int] = None
    last: Optional[int] = None

    @property
    def world(self) -> int:
        """Ranks the layout needs."""
        return self.tp * self.pp * self.cp

    @property
    def slug(self) -> str:
        """``tp2-sp``, ``pp2-vpp2-first2``, ``tp2-sp-cp2``, ..."""
        parts = []
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("-sp" if self.sp else ""))
        if self.pp > 1:
            parts.append(f"pp{self.pp}" + (f"-vpp{self.vp}" if self.vp else ""))
            parts += [f"first{self.first}"] if self.first is not None else []
            parts += [f"last{self.last}"] if self.last is not None else []
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        return "-".join(parts) or "single"


@dataclasses.dataclass(frozen=True)
class Model:
    """The tiny MLA model of a case (DeepSeek's structure, small widths)."""

    hidden: int = 256
    heads: int = 8
    q_lora: Optional[int] = 96
    kv_lora: int = 64
    qk: int = 32
    rope: int = 16
    v: int = 40
    layers: int = 1
    ffn: int = 512
    vocab: int = 512
    seq: int = 128
    batch: int = 2
    init_std: float = 0.02
    lengths: Tuple[int, ...] = ()
    tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Case:
    """One multi-GPU case (a plan entry for the worker)."""

    name: str
    kind: str
    layout: Layout
    model: Model
    spec: str = "te"
    backend: str = "auto"
    dtype: str = "fp32"
    tolerance: Tuple[float, float] = (1e-5, 1e-4)
    steps: int = 4
    microbatches: int = 4
    recompute: Optional[str] = None
    cp_comm_type: Any = None
    sweep: Tuple[int, ...] = ()
    reps: int = 5
    golden: Optional[str] = None
    known_issue: Optional[Dict[str, Any]] = None
    needs: Tuple[str, ...] = ("cuda", "te")
    budget_s: int = 60
    deterministic: bool = True

    def plan(self) -> Dict[str, Any]:
        """The JSON the worker reads."""
        data = dataclasses.asdict(self)
        data["layout"] = dict(data["layout"], slug=self.layout.slug)
        data["model"]["lengths"] = list(self.model.lengths)
        data["tolerance"] = list(self.tolerance)
        data["sweep"] = list(self.sweep)
        data["needs"] = list(self.needs)
        if isinstance(self.cp_comm_type, tuple):
            data["cp_comm_type"] = list(self.cp_comm_type)
        return data


#: Tolerances, ``(output, gradient)`` as ``max|got - want| / max|want|`` against the one-GPU
#: reference in the same dtype: fp32 local spec (only reduction order differs), fp32 TE spec
#: (TE may run fp32 GEMMs as TF32, whose rounding depends on the split), bf16 (CP: each rank
#: merges partial softmax results and rounds to bf16).
TOL_FP32 = (1e-5, 1e-4)
TOL_TF32 = (2e-3, 5e-3)
TOL_BF16 = (2e-2, 5e-2)
#: The bf16 context-parallel cases (fused attention; determinism checked by training twice).
BF16: Dict[str, Any] = dict(dtype="bf16", tolerance=TOL_BF16, deterministic=False)


def _cp_lengths(cp: int) -> Tuple[int, ...]:
    unit = 2 * cp
    return tuple(unit * n for n in (16, 40, 8, 64))


def default_cases(nproc: int) -> List[Case]:
    """The cases for ``nproc`` ranks (N=2: TP, PP, CP alone; even N >= 4: TP2 x PP, TP2 x CP).

    Raises:
        UsageError: No layouts are defined for ``nproc`` (odd, or below 2).
    """
    if nproc < 2 or nproc % 2:
        raise UsageError(
            f"--nproc {nproc}: the multi-GPU cases are defined for an even number of ranks >= 2",
            "use --nproc 2, 4 or 8 (the single-GPU suite runs without --nproc)",
        )
    small = Model(layers=1, init_std=0.1, seq=128, batch=2)
    gpt = Model(layers=2, seq=128, batch=2)
    if nproc == 2:
        return _two_gpu_cases(small, gpt)
    half = nproc // 2
    vp = 2
    pp_gpt = dataclasses.replace(gpt, layers=vp * (1 + 2 * (half - 1)))
    block = dataclasses.replace(small, layers=2, lengths=_cp_lengths(half))
    tp_pp = Layout(tp=2, sp=True, pp=half, vp=vp, first=vp)
    tp_cp = Layout(tp=2, sp=True, cp=half)
    return [
        Case(f"{tp_pp.slug}/gpt/te", "pipeline", tp_pp, pp_gpt, tolerance=TOL_TF32,
             golden=tp_pp.slug, budget_s=90),
        Case(f"{tp_cp.slug}/block-p2p/te", "cp_block", tp_cp, block, cp_comm_type="p2p",
             golden=tp_cp.slug, budget_s=90, **BF16),
        Case(f"{tp_cp.slug}/block-a2a/te", "cp_block", tp_cp, block, cp_comm_type="a2a",
             budget_s=90, **BF16),
    ]  # fmt: skip


def _two_gpu_cases(small: Model, gpt: Model) -> List[Case]:
    tp_sp, tp = Layout(tp=2, sp=True), Layout(tp=2)
    pp = Layout(pp=2, vp=2, first=2)
    pp_both = Layout(pp=2, vp=2, first=4, last=2)
    cp = Layout(cp=2)
    pp_gpt = dataclasses.replace(gpt, layers=6)
    block = dataclasses.replace(small, layers=2, lengths=_cp_lengths(2))
    # Local spec, no TE: these run on CPU processes (gloo) as well.
    local = dict(spec="local", backend="local", tolerance=TOL_FP32, needs=())
    return [
        Case(f"{tp_sp.slug}/layer/te", "tp_layer", tp_sp, small, tolerance=TOL_TF32),
        Case(f"{tp_sp.slug}/gpt/te", "tp_gpt", tp_sp, gpt, tolerance=TOL_TF32,
             golden=tp_sp.slug),
        # Megatron's local spec builds torch norms, which refuse sequence parallelism
        # without apex: TP without SP, where upstream's k_pos_emb gradient is not reduced.
        Case(f"{tp.slug}/layer/local", "tp_layer", tp, small, known_issue=ISSUE_1699, **local),
        Case(f"{tp.slug}/gpt/local", "tp_gpt", tp, gpt, known_issue=ISSUE_1699, **local),
        Case(f"{pp.slug}/gpt/te", "pipeline", pp, pp_gpt, tolerance=TOL_TF32, golden=pp.slug,
             budget_s=90),
        Case(f"{pp.slug}-recompute/gpt/te", "pipeline", pp, pp_gpt, tolerance=TOL_TF32,
             recompute="full", budget_s=90),
        Case(f"{pp.slug}/gpt/local", "pipeline", pp, pp_gpt, budget_s=90, **local),
        Case(f"{pp_both.slug}/gpt/local", "pipeline", pp_both, pp_gpt, known_issue=ZERO_MIDDLE,
             **local),
        Case(f"{cp.slug}/block-p2p/te", "cp_block", cp, block, cp_comm_type="p2p",
             golden=cp.slug, budget_s=90, **BF16),
        Case(f"{cp.slug}/block-a2a/te", "cp_block", cp, block, cp_comm_type="a2a", budget_s=90,
             **BF16),
        Case(f"{cp.slug}/block-per-layer/te", "cp_block", cp, block, cp_comm_type=("a2a", "p2p"),
             budget_s=90, **BF16),
        Case(f"{cp.slug}/sweep/te", "cp_sweep", cp, dataclasses.replace(small, tokens=2048),
             sweep=(1, 4, 16, 64, 256), budget_s=150, **BF16),
    ]  # fmt: skip


def select(cases: Sequence[Case], names: Optional[Sequence[str]]) -> List[Case]:
    """The cases whose name equals or starts with one of ``names`` (all when none given).

    Raises:
        UsageError: A name matches no case.
    """
    if not names:
        return list(cases)
    chosen, unknown = [], []
    for name in names:
        hits = [c for c in cases if c.name == name or c.name.startswith(name)]
        if not hits:
            unknown.append(name)
        chosen += [c for c in hits if c not in chosen]
    if unknown:
        raise UsageError(
            f"no multi-GPU case matches {unknown}",
            "choose from: " + ", ".join(c.name for c in cases),
        )
    return chosen


# --- validation ----------------------------------------------------------------------------------


def layout_problems(case: Case, nproc: int) -> List[str]:
    """What keeps ``case`` from running on ``nproc`` ranks (empty: nothing)."""
    lay, m = case.layout, case.model
    out = []
    if lay.world != nproc:
        out.append(f"TP*PP*CP = {lay.tp}*{lay.pp}*{lay.cp} = {lay.world} ranks, not {nproc}")
    if m.heads % lay.tp:
        out.append(f"{m.heads} attention heads do not split over TP={lay.tp}")
    comm = case.cp_comm_type if isinstance(case.cp_comm_type, tuple) else (case.cp_comm_type,)
    if lay.cp > 1 and any(c and "a2a" in c for c in comm) and (m.heads // lay.tp) % lay.cp:
        out.append(f"{m.heads // lay.tp} heads per TP rank do not split over CP={lay.cp} (a2a)")
    if isinstance(case.cp_comm_type, tuple) and len(case.cp_comm_type) != m.layers:
        out.append(f"cp_comm_type lists {len(case.cp_comm_type)} entries for {m.layers} layers")
    if case.kind in ("tp_gpt", "pipeline") and m.vocab % lay.tp:
        out.append(f"vocabulary {m.vocab} does not split over TP={lay.tp}")
    if lay.sp and lay.tp > 1 and case.kind in ("tp_layer", "tp_gpt", "pipeline"):
        if m.seq % lay.tp:
            out.append(f"sequence length {m.seq} does not split over TP={lay.tp} (SP)")
    out += _pipeline_problems(case)
    out += _cp_problems(case)
    return out


def _pipeline_problems(case: Case) -> List[str]:
    lay, layers = case.layout, case.model.layers
    if lay.pp == 1:
        return [] if lay.vp is None else ["virtual stages need PP > 1"]
    vp = lay.vp or 1
    out = []
    if lay.vp and case.microbatches % lay.pp:
        out.append(f"{case.microbatches} micro-batches do not divide over PP={lay.pp}")
    if lay.first is None and lay.last is None:
        if layers % (lay.pp * vp):
            out.append(f"{layers} layers do not split over PP={lay.pp} x VPP={vp}")
        return out
    for name, value in (("first", lay.first), ("last", lay.last)):
        if value is not None and value % vp:
            out.append(f"{value} layers in the {name} stage do not split over VPP={vp}")
    middle = lay.pp - (lay.first is not None) - (lay.last is not None)
    rest = layers - (lay.first or 0) - (lay.last or 0)
    if middle < 0 or rest < 0:
        out.append(f"first/last stage layers exceed {layers} layers on PP={lay.pp}")
    elif middle == 0 and rest:
        out.append(f"{rest} layers left for no middle stage (PP={lay.pp})")
    elif middle and (rest == 0 or rest % (middle * vp)):
        out.append(f"{rest} middle layers do not split over {middle} stage(s) x VPP={vp}")
    return out


def _cp_problems(case: Case) -> List[str]:
    lay, m = case.layout, case.model
    if lay.cp == 1:
        return []
    unit = 2 * lay.cp
    out = []
    if case.kind == "cp_sweep":
        for count in case.sweep:
            if m.tokens % count or (m.tokens // count) % unit:
                out.append(
                    f"{m.tokens} tokens in {count} sequences: each must be a multiple of "
                    f"2*CP={unit}"
                )
        lengths = [m.tokens]
    else:
        lengths = list(m.lengths)
        if not lengths:
            out.append("a context-parallel case needs packed sequence lengths")
        bad = [n for n in lengths if n % unit]
        if bad:
            out.append(f"THD sequences {bad} are not multiples of 2*CP={unit}")
    if lay.sp and lay.tp > 1 and any((n // lay.cp) % lay.tp for n in lengths):
        out.append(f"tokens per CP rank do not split over TP={lay.tp} (SP)")
    return out


def validate(cases: Sequence[Case], nproc: int) -> None:
    """Every layout problem of every case, at once.

    Raises:
        UsageError: At least one case cannot run on ``nproc`` ranks.
    """
    problems = [f"{c.name}: {p}" for c in cases for p in layout_problems(c, nproc)]
    if problems:
        raise UsageError(
            "the multi-GPU layout does not fit the model:\n    " + "\n    ".join(problems),
            "pick cases that fit (--cases) or another --nproc; each layout needs "
            "TP*PP*CP = N ranks, heads divisible by TP, layers by PP x VPP, and packed "
            "sequences by 2*CP",
        )


_NCCL_PROBE = r"""
import json, torch, torch.distributed as dist
info = {"nccl": bool(dist.is_available() and dist.is_nccl_available())}
try:
    info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as exc:
    info["nccl"], info["nccl_error"] = False, str(exc)[:200]
print(json.dumps(info))
"""


def check_devices(device: Any, nproc: int, python: str, probe_nccl: bool = True) -> Dict[str, Any]:
    """N visible GPUs and NCCL, before any process group starts.

    Raises:
        DeviceError: No CUDA, fewer than ``nproc`` devices, or no NCCL in ``python``'s torch.
    """
    _suite.require_gpu(device)
    if device.device_count < nproc:
        raise DeviceError(
            f"--nproc {nproc} needs {nproc} CUDA devices; torch sees {device.device_count}",
            "run on a machine with that many GPUs, lower --nproc, or check " "CUDA_VISIBLE_DEVICES",
        )
    if not probe_nccl:
        return {}
    try:
        proc = subprocess.run(
            [python, "-c", _NCCL_PROBE], capture_output=True, text=True, timeout=120, check=False
        )
        info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError) as exc:
        info = {"nccl": False, "nccl_error": f"probe failed: {exc}"}
    if not info.get("nccl"):
        raise DeviceError(
            f"NCCL is not available to {python}'s torch ({info.get('nccl_error', 'no NCCL')})",
            "install a CUDA build of torch with NCCL (the multi-GPU phase runs torchrun + " "NCCL)",
        )
    return info


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


# --- goldens and results -------------------------------------------------------------------------


def golden_name(slug: str, te: Optional[str], layout: str) -> str:
    """``golden_values_<card>_te<TE>_<layout>.json``."""
    return _suite.golden_filename(slug, te).replace(".json", f"_{layout}.json")


def settle_goldens(
    records: Sequence[Dict[str, Any]], folder: Path, root: Path, tag: str, device: Any, update: bool
) -> Dict[str, Any]:
    """Write or check one golden-values file per layout from the patched side's records."""
    out: Dict[str, Any] = {}
    for record in records:
        layout = record.get("golden")
        if record.get("side") != "patched" or not layout:
            continue
        name = golden_name(device.slug, device.te, layout)
        info: Dict[str, Any] = {"file": name, "case": record["name"]}
        metrics = record.get("metrics")
        if record.get("outcome") != "ran" or not metrics:
            info["status"] = "not recorded"
            out[layout] = info
            continue
        doc = _suite.golden_document(metrics)
        committed = folder / name
        if record.get("deterministic") is False:
            # Two trainings in one process differed: nothing to hold a later run to.
            info["status"] = "nondeterministic"
            _suite.write_golden(committed.with_suffix(".observed.json"), doc)
        elif committed.is_file() and not update:
            problems = _suite.compare_golden_exact(doc, _suite.read_golden(committed))
            info["problems"] = problems
            info["status"] = "mismatch" if problems else "matched"
            if problems:
                _suite.write_golden(committed.with_suffix(".observed.json"), doc)
        else:
            info["status"] = "updated" if committed.is_file() else "recorded"
            _suite.write_golden(committed, doc)
        cross = {}
        for path in sorted(root.glob(f"*/{device.slug}/multigpu/{name}")):
            other = path.parent.parent.parent.name
            if other != tag:
                cross[other] = _suite.compare_golden_cross(doc, _suite.read_golden(path))
        info["cross_tag"] = cross
        out[layout] = info
    return out


def summarize(cases: Sequence[Case], records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per case: the patched result against the vanilla outcome."""
    by = {(r.get("name"), r.get("side")): r for r in records}
    rows = []
    for case in cases:
        row: Dict[str, Any] = {"name": case.name, "layout": case.layout.slug, "kind": case.kind}
        for side in SIDES:
            r = by.get((case.name, side))
            if r is None:
                continue
            row[side] = {
                "outcome": r.get("outcome"),
                "ok": r.get("ok"),
                "max_rel": r.get("max_rel"),
                "failed_checks": sorted(k for k, v in (r.get("checks") or {}).items() if not v),
                "message": (
                    (r.get("message") or "").splitlines()[0][:200] if r.get("message") else ""
                ),
                "seconds": r.get("seconds"),
            }
        if case.known_issue:
            row["known_issue"] = case.known_issue["ref"]
            if "sides" in case.known_issue:
                row["known_issue_sides"] = list(case.known_issue["sides"])
        rows.append(row)
    return rows


def build_results(
    *, tree, baseline, device, nproc, cases, records, goldens, started, seconds, nccl
) -> Dict[str, Any]:
    """``results.json`` of the multi-GPU phase (suite schema, this phase's ``kind``)."""
    rows = summarize(cases, records)
    patched = [r.get("patched") or {} for r in rows]
    ran = [p for p in patched if p.get("outcome") != "skipped"]
    counts = {
        "passed": sum(1 for p in ran if p.get("ok")),
        "failed": sum(1 for p in ran if p.get("ok") is False),
        "skipped": sum(1 for p in patched if p.get("outcome") == "skipped"),
    }
    layouts = {c.layout.slug: dict(dataclasses.asdict(c.layout), slug=c.layout.slug) for c in cases}
    env = {
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
        **nccl,
    }
    return {
        "schema_version": _suite.SCHEMA_VERSION,
        "kind": KIND,
        "mla_seam_version": __version__,
        "started": started,
        "seconds": round(seconds, 1),
        "tag": tree.tag,
        "megatron": tree.as_dict(),
        "baseline": baseline.as_dict() if baseline else None,
        "environment": env,
        "parallel": {
            "world_size": nproc,
            "tensor_model_parallel": None,
            "pipeline_model_parallel": None,
            "virtual_pipeline_model_parallel": None,
            "context_parallel": None,
            "expert_model_parallel": 1,
            "layouts": sorted(layouts.values(), key=lambda x: x["slug"]),
        },
        "ok": counts["failed"] == 0
        and counts["passed"] > 0
        and all(g.get("status") != "mismatch" for g in goldens.values()),
        "counts": counts,
        "cases": rows,
        "golden": goldens,
        "records": list(records),
    }


def render_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the cases, patched against vanilla, for people."""
    env = results["environment"]
    fmt = _render._fmt  # pylint: disable=protected-access
    lines = [
        f"# mla-seam multi-GPU suite: {results['tag']} on {results['parallel']['world_size']} x "
        f"{env.get('card') or '?'}",
        "",
        f"Overall: **{'PASS' if results['ok'] else 'FAIL'}** ({results['counts']}; "
        f"{results['seconds']} s, started {results['started']}).",
        "",
        f"torch {env.get('torch')} / CUDA {env.get('cuda')}, TE {env.get('transformer_engine')}, "
        f"cuDNN {env.get('cudnn')}, NCCL {env.get('nccl_version', '-')}, Python "
        f"{env.get('python')}. Differences are max|got - want| / max|want| against the one-GPU "
        "reference in the same process (same seed and weights).",
        "",
        "| case | patched | vanilla | out | grads | loss | failed checks | known issue |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        p, v = row.get("patched") or {}, row.get("vanilla") or {}
        rel = p.get("max_rel") or {}
        verdict = p.get("outcome", "-") + ("" if p.get("ok") is None else f" ({fmt(p['ok'])})")
        known = row.get("known_issue", "-")
        if row.get("known_issue_sides"):
            known += f" ({', '.join(row['known_issue_sides'])} only)"
        lines.append(
            f"| {row['name']} | {verdict} | {v.get('outcome', '-')} | {fmt(rel.get('out'))} | "
            f"{fmt(rel.get('grads'))} | {fmt(rel.get('loss'))} | "
            f"{', '.join(p.get('failed_checks') or []) or '-'} | {known} |"
        )
    lines += ["", "## Golden values", ""]
    for layout, info in sorted(results["golden"].items()):
        lines.append(f"- {layout}: `{info['file']}` **{info['status']}**")
        for problem in (info.get("problems") or [])[:5]:
            lines.append(f"  - {problem}")
    sweeps = [r for r in results["records"] if r.get("sweep")]
    if sweeps:
        lines += ["", "## THD sequence-count sweep at CP (ms per fwd+bwd, slowest rank)", ""]
        lines += ["| side | sequences | ms | out | grads |", "|---|---|---|---|---|"]
        for r in sweeps:
            for s in r["sweep"]:
                lines.append(
                    f"| {r['side']} | {s['sequences']} | {fmt(s['ms_median'])} | "
                    f"{fmt(s.get('out'))} | {fmt(s.get('grads'))} |"
                )
    bad = [r for r in results["records"] if r.get("outcome") not in ("ran", "skipped")]
    if bad:
        lines += ["", "## Not run to the end", ""]
        for r in bad:
            first = (r.get("message") or "").splitlines()[:1]
            lines.append(f"- {r['name']} ({r['side']}): {r['outcome']}: {' '.join(first)[:300]}")
    return "\n".join(lines) + "\n"


# --- the entry points ----------------------------------------------------------------------------


def run_multigpu(
    megatron_dir: os.PathLike,
    baseline_dir: Optional[os.PathLike],
    out_dir: Optional[os.PathLike],
    nproc: int,
    cases: Optional[Sequence[str]] = None,
    *,
    python: Optional[str] = None,
    update_goldens: bool = False,
    backend: Optional[str] = None,
    time_budget_s: Optional[float] = None,
    fresh: bool = False,
    device: Any = None,
) -> Dict[str, Any]:
    """Run the multi-GPU cases in the patched (and vanilla) tree; write and return the results.

    Args:
        megatron_dir: The patched tree.
        baseline_dir: The vanilla tree of the same release (``None``: patched only).
        out_dir: Results root (``<out>/<tag>/<card>/multigpu/``); default the repo's results/.
        nproc: Ranks (GPUs).
        cases: Case names or prefixes (default: all of :func:`default_cases`).
        python: Interpreter with torch and Megatron's needs (default: this one).
        update_goldens: Replace this tag's golden values instead of comparing.
        backend: ``"gloo"`` runs on CPU processes (tests; no GPU checks); default NCCL.
        time_budget_s: Stop starting cases after this many seconds (results still written).
        fresh: Ignore the resume journal of an earlier run with the same plan.
        device: A probed :class:`mla_seam.suite.DeviceInfo` (tests).

    Raises:
        UsageError: Bad --nproc, unknown case, a layout that does not fit, a patched baseline.
        DeviceError: Fewer GPUs than ``nproc``, or no NCCL.
    """
    python = python or sys.executable
    tree = _suite.inspect_tree(megatron_dir, "--megatron")
    base = _suite.inspect_tree(baseline_dir, "--baseline-megatron") if baseline_dir else None
    if base and base.patched:
        raise UsageError(
            f"--baseline-megatron {base.path} carries the adapter",
            "pass the vanilla tree of the same release (mla-seam upstream get --into DIR)",
        )
    chosen = select(default_cases(nproc), cases)
    validate(chosen, nproc)
    device = device or _suite.probe_device(python)
    nccl = {}
    if backend != "gloo":
        nccl = check_devices(device, nproc, python)
    deadline = time.monotonic() + (time_budget_s or 10**9)
    root = Path(out_dir) if out_dir else _runner.default_out()
    folder = root / tree.tag / device.slug / "multigpu"
    state = folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    plan = {"nproc": nproc, "cases": [c.plan() for c in chosen]}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    marker = state / "plan.sha256"
    if fresh or not marker.is_file() or marker.read_text(encoding="utf-8").strip() != digest:
        for old in state.glob("records.*.jsonl"):
            old.unlink()
    marker.write_text(digest + "\n", encoding="utf-8")
    (state / "plan.json").write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    repo = paths.gpu_tests_dir().parents[1]  # the folder holding tests/gpu (repo or bundle)
    records: List[Dict[str, Any]] = []
    for side, path in (("patched", tree.path), ("vanilla", base.path if base else None)):
        if path is None:
            continue
        records += run_side(
            side, path, chosen, nproc=nproc, python=python, repo=repo, state=state,
            backend=backend, deadline=deadline,
        )  # fmt: skip
    goldens = settle_goldens(records, folder, root, tree.tag, device, update_goldens)
    results = build_results(
        tree=tree, baseline=base, device=device, nproc=nproc, cases=chosen, records=records,
        goldens=goldens, started=started, seconds=time.monotonic() - t0, nccl=nccl,
    )  # fmt: skip
    (folder / "results.json").write_text(
        json.dumps(results, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    (folder / "results.md").write_text(render_markdown(results), encoding="utf-8")
    results["folder"] = str(folder)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-GPU options of ``mla-seam suite`` (``--nproc`` selects this phase)."""
    group = parser.add_argument_group("multi-GPU (torchrun + NCCL)")
    group.add_argument("--nproc", type=int, metavar="N", help="run the multi-GPU cases on N GPUs")
    group.add_argument(
        "--cases", metavar="NAMES", help="comma-separated case names or prefixes (default: all)"
    )
    group.add_argument(
        "--time-budget-s", type=float, metavar="S", help="start no case after S seconds"
    )
    group.add_argument(
        "--fresh", action="store_true", help="ignore the resume journal of an earlier run"
    )
    group.add_argument("--dist-backend", choices=("nccl", "gloo"), help=argparse.SUPPRESS)


def run_from_args(args: argparse.Namespace) -> int:
    """``mla-seam suite --nproc N ...``: exit 0 when every patched case passed."""
    results = run_multigpu(
        args.megatron,
        args.baseline_megatron,
        args.out,
        args.nproc,
        [n for n in (args.cases or "").split(",") if n] or None,
        python=getattr(args, "python", None),
        update_goldens=getattr(args, "update_goldens", False),
        backend=args.dist_backend,
        time_budget_s=args.time_budget_s,
        fresh=args.fresh,
    )
    sys.stdout.write(f"{results['folder']}/results.md\n")
    for row in results["cases"]:
        p, v = row.get("patched") or {}, row.get("vanilla") or {}
        status = "ok" if p.get("ok") else ("skipped" if p.get("outcome") == "skipped" else "FAILED")
        sys.stdout.write(
            f"  {row['name']:<36} {status:<8} patched={p.get('outcome')} "
            f"vanilla={v.get('outcome', '-')}\n"
        )
    for layout, info in sorted(results["golden"].items()):
        sys.stdout.write(f"  golden {layout:<28} {info['status']}\n")
    return 0 if results["ok"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.suite_dist``: the multi-GPU phase alone (no GitPython needed)."""
    from mla_seam.errors import SeamError  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="python -m mla_seam.suite_dist")
    parser.add_argument("--megatron", required=True, metavar="DIR", help="the patched tree")
    parser.add_argument("--baseline-megatron", metavar="DIR", help="the vanilla tree")
    parser.add_argument("--out", metavar="DIR", help="results root (default: results/)")
    parser.add_argument("--python", metavar="EXE", help="interpreter for the ranks")
    parser.add_argument("--update-goldens", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.nproc:
        parser.error("--nproc N is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return run_from_args(args)
    except SeamError as err:
        log.error("mla-seam suite: %s", err)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
