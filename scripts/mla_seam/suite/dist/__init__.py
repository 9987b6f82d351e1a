"""Multi-GPU phase of the suite: TP, PP with virtual stages and CP against one-GPU references.

``mla-seam suite --nproc N`` (:func:`run_multigpu`), or on a GPU machine without the other
verbs' needs::

    python -m mla_seam.suite --nproc 2 --megatron PATCHED --baseline-megatron VANILLA

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

Modules: :mod:`~mla_seam.suite.dist.cases` (cases, layout checks, device checks),
:mod:`~mla_seam.suite.dist.launch` (torchrun groups, the resume journal),
:mod:`~mla_seam.suite.dist.report` (goldens, results, markdown) and
:mod:`~mla_seam.suite.dist.runner` (the entry point). This face only exports.
"""

from mla_seam.suite.dist.cases import (
    BF16,
    ISSUE_1699,
    KIND,
    SIDES,
    STARTUP_S,
    TOL_BF16,
    TOL_FP32,
    TOL_TF32,
    WORKER,
    ZERO_MIDDLE,
    Case,
    Layout,
    Model,
    check_devices,
    default_cases,
    layout_problems,
    select,
    validate,
)
from mla_seam.suite.dist.launch import read_journal, run_side
from mla_seam.suite.dist.report import (
    build_results,
    golden_name,
    render_markdown,
    settle_goldens,
    summarize,
)
from mla_seam.suite.dist.runner import run_multigpu

__all__ = [
    "BF16",
    "ISSUE_1699",
    "KIND",
    "SIDES",
    "STARTUP_S",
    "TOL_BF16",
    "TOL_FP32",
    "TOL_TF32",
    "WORKER",
    "ZERO_MIDDLE",
    "Case",
    "Layout",
    "Model",
    "build_results",
    "check_devices",
    "default_cases",
    "golden_name",
    "layout_problems",
    "read_journal",
    "render_markdown",
    "run_multigpu",
    "run_side",
    "select",
    "settle_goldens",
    "summarize",
    "validate",
]
