"""The ``suite`` verb: the GPU suite (``tests/gpu``) on three trees, with upstream/overlay attribution.

::

    mla-seam suite --release 0.19 [--base VERSION | --base-from DRIFT_JSON] [--work DIR] [--out DIR]
                   [--only PHASES] [--update-goldens]
    mla-seam suite --megatron PATCHED [--vanilla-megatron VANILLA] [--base-megatron BASE] ...
    mla-seam suite --release V:BASE[=UNITS] ... [--target ARCHIVE:BASE] [--dist V:N]
                   [--deadline-s S] [--gpus LIST] [--work DIR] [--out DIR]

One run measures up to three trees on one card (:mod:`mla_seam.suite.trees`): vanilla and
patched of the release, and patched of the base release (the last release the drift report
marked good). ``--release`` stages them from the mla-seam cache (PyPI sdists or a git URL) and
applies the series; the ``--*-megatron`` options take trees staged by hand.

Each phase (:data:`PHASES`, one row per pytest file and the roles it runs on) is one pytest
process inside one tree: smoke, the independent oracles, the single-GPU matrix, golden values,
benchmarks, and the measurement files of issue #8 (THD sequence-count sweep with rope fusion
off and on, HF parity, kernel and sync counts) where this checkout has them. Every measured
quantity is attributed (:mod:`mla_seam.suite.attribution`): upstream changed, overlay broke,
absorbed, unchanged. Results per release and card in ``<out>/<tag>/<card>/``: ``results.json``,
``results.md``, ``bench.json``, ``verdict.json`` (read by ``mla-seam drift --gpu-results``) and
the golden-values files (see ``results/README.md``).

``--only`` runs a subset (phase names, or units such as ``bench@vanilla``) and merges it into an
existing ``results.json`` of the same tag, card, software and trees: the lent device allows 10
minutes per command, so a release can take two commands. Without a visible CUDA device the verb
raises :class:`~mla_seam.errors.DeviceError` (exit 18) before running anything. Multi-GPU phases
are rows with ``nproc > 1`` (:mod:`mla_seam.suite.dist` launches them through torchrun).
Several releases and moving targets run over a host's GPUs inside a deadline, resumable
(:mod:`mla_seam.suite.lines`: the one GPU driver, which the nightly's GPU phase calls too).

``python -m mla_seam.suite`` is the same verb for GPU machines without GitPython (running needs
only the standard library and the tests' own imports; ``--release`` staging needs GitPython).

Modules: :mod:`~mla_seam.suite.command` (the verb's options), :mod:`~mla_seam.suite.trees`
(roles, staging), :mod:`~mla_seam.suite.phases`, :mod:`~mla_seam.suite.runner` (one run, its
files, ``--reattribute``), :mod:`~mla_seam.suite.attribution`, :mod:`~mla_seam.suite.goldens`,
:mod:`~mla_seam.suite.benchmarks`, :mod:`~mla_seam.suite.render`, :mod:`~mla_seam.suite.device`,
:mod:`~mla_seam.suite.lines` (several suites over a host's GPUs),
:mod:`~mla_seam.suite.fleet` (processes over a host's GPUs) and the multi-GPU phase
:mod:`~mla_seam.suite.dist`. This face only exports; no module of the package imports it.
"""

from __future__ import annotations

from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.suite import device
from mla_seam.suite.attribution import build_verdict
from mla_seam.suite.benchmarks import GOALS, THD_GOAL_FROM, summarize_bench, summarize_cases
from mla_seam.suite.command import main, register, run
from mla_seam.suite.device import DeviceInfo, card_slug, probe_device, require_gpu
from mla_seam.suite.goldens import (
    GOLDEN_METRICS,
    compare_golden_cross,
    compare_golden_exact,
    golden_document,
    golden_filename,
    read_golden,
    validate_golden,
    write_golden,
)
from mla_seam.suite.lines import Line, LineOutcome, run_lines
from mla_seam.suite.phases import (
    PHASE_NAMES,
    PHASES,
    Phase,
    PhaseResult,
    Unit,
    parse_junit,
    parse_junit_cases,
    read_records,
    run_phase,
)
from mla_seam.suite.render import render_markdown
from mla_seam.suite.runner import SCHEMA_VERSION, build_results, reattribute, run_suite
from mla_seam.suite.trees import (
    DEFAULT_BASE,
    ROLES,
    Source,
    TreeInfo,
    base_from_report,
    choose_base,
    inspect_tree,
    stage,
)

__all__ = [
    "ADAPTER_RELPATH",
    "DEFAULT_BASE",
    "GOALS",
    "GOLDEN_METRICS",
    "PHASES",
    "PHASE_NAMES",
    "ROLES",
    "SCHEMA_VERSION",
    "THD_GOAL_FROM",
    "DeviceInfo",
    "Line",
    "LineOutcome",
    "Phase",
    "Source",
    "PhaseResult",
    "TreeInfo",
    "Unit",
    "base_from_report",
    "choose_base",
    "build_results",
    "build_verdict",
    "card_slug",
    "compare_golden_cross",
    "compare_golden_exact",
    "device",
    "golden_document",
    "golden_filename",
    "inspect_tree",
    "main",
    "parse_junit",
    "parse_junit_cases",
    "probe_device",
    "read_golden",
    "read_records",
    "register",
    "render_markdown",
    "require_gpu",
    "run",
    "run_phase",
    "run_lines",
    "run_suite",
    "stage",
    "summarize_bench",
    "summarize_cases",
    "validate_golden",
    "write_golden",
]
