"""Running the multi-GPU phase: the cases in each tree, then goldens and the results files."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mla_seam import paths
from mla_seam.errors import UsageError
from mla_seam.suite.device import probe_device
from mla_seam.suite.dist.cases import check_devices, default_cases, select, validate
from mla_seam.suite.dist.launch import run_side
from mla_seam.suite.dist.report import build_results, render_markdown, settle_goldens
from mla_seam.suite.runner import default_out, reattribute, results_folder
from mla_seam.suite.trees import inspect_tree

log = logging.getLogger(__name__)


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
    tree = inspect_tree(megatron_dir, "--megatron")
    base = inspect_tree(baseline_dir, "--baseline-megatron") if baseline_dir else None
    if base and base.patched:
        raise UsageError(
            f"--baseline-megatron {base.path} carries the adapter",
            "pass the vanilla tree of the same release (mla-seam upstream get --into DIR)",
        )
    chosen = select(default_cases(nproc), cases)
    validate(chosen, nproc)
    device = device or probe_device(python)
    nccl = {}
    if backend != "gloo":
        nccl = check_devices(device, nproc, python)
    deadline = time.monotonic() + (time_budget_s or 10**9)
    root = Path(out_dir) if out_dir else default_out()
    folder = results_folder(root, tree.tag, device.slug) / "multigpu"
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
        reattribute(folder.parent)
    results["folder"] = str(folder)
    return results
