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

Modules: :mod:`~mla_seam.suite_dist.cases` (cases, layout checks, device checks),
:mod:`~mla_seam.suite_dist.launch` (torchrun groups, the resume journal) and
:mod:`~mla_seam.suite_dist.report` (goldens, results, markdown); the entry points are here.
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
from mla_seam.suite_dist.cases import (  # noqa: F401  (the package's names)
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
from mla_seam.suite_dist.launch import (  # noqa: F401  (the package's names)
    read_journal,
    run_side,
)
from mla_seam.suite_dist.report import (  # noqa: F401  (the package's names)
    build_results,
    golden_name,
    render_markdown,
    settle_goldens,
    summarize,
)

log = logging.getLogger(__name__)

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
    if (folder.parent / "results.json").is_file():  # the folder's verdict counts these cases
        _runner.reattribute(folder.parent)
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
