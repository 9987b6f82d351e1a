"""The multi-GPU cases (layouts, models, tolerances, known upstream issues) and their checks.

Everything here is decided before any process starts: which cases a world size gets, whether
each layout fits its model, and whether the host has the GPUs and NCCL it needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mla_seam.errors import DeviceError, UsageError
from mla_seam.suite.device import require_gpu

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
#: The same gradient fault with sequence parallelism, on releases whose TE spec builds MLA's
#: down projections column-parallel (0.13): their outputs are gathered over TP by a function
#: whose backward only splits, so the shared RoPE key's gradient keeps each rank's heads only.
#: The worker checks the condition in each tree (``when``); elsewhere the case is judged as usual.
ISSUE_1699_COLUMN_DOWN = dict(
    ISSUE_1699,
    when="te_down_projections_column_parallel",
    text="MLA's down projections are column-parallel in this release's TE spec: the gathered "
    "RoPE key's gradient is not summed over TP ranks, with or without sequence parallelism",
)
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
        Case(f"{tp_sp.slug}/layer/te", "tp_layer", tp_sp, small, tolerance=TOL_TF32,
             known_issue=ISSUE_1699_COLUMN_DOWN),
        Case(f"{tp_sp.slug}/gpt/te", "tp_gpt", tp_sp, gpt, tolerance=TOL_TF32,
             golden=tp_sp.slug, known_issue=ISSUE_1699_COLUMN_DOWN),
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
    require_gpu(device)
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
