"""Running the suite: every selected unit (phase x tree role), then results, verdict and files.

``<out>/<tag>/<card>/`` receives ``results.json`` (schema :data:`SCHEMA_VERSION`),
``results.md``, ``bench.json``, ``verdict.json`` (:mod:`mla_seam.suite.attribution`) and the
golden-values files (:mod:`mla_seam.suite.goldens`). ``--only`` runs merge into an existing
``results.json`` of the same tag, card, torch, TE and trees, so a suite split over several
commands (the lent device allows 10 minutes per command) still ends in one file and one verdict.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mla_seam import __version__, paths
from mla_seam.errors import UsageError
from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.suite import attribution
from mla_seam.suite import device as device_mod
from mla_seam.suite.benchmarks import summarize_bench, summarize_cases
from mla_seam.suite.device import DeviceInfo
from mla_seam.suite.goldens import golden_phase
from mla_seam.suite.phases import (
    PHASE_NAMES,
    PhaseResult,
    Unit,
    run_phase,
    select,
    unavailable,
    unit_name,
)
from mla_seam.suite.render import render_markdown
from mla_seam.suite.trees import ROLES, TreeInfo, inspect_tree

log = logging.getLogger(__name__)

#: Version of results.json / bench.json. Bump on any incompatible change (results/README.md).
#: 2: tree roles (``trees``, per-role ``golden``, ``phases[].role``/``tests``, ``records[].role``)
#: and the three-tree ``verdict``.
SCHEMA_VERSION = 2

Runner = Callable[..., Tuple[PhaseResult, List[Dict[str, Any]]]]


def default_out() -> Path:
    """The repository's ``results/`` (or ``./results`` outside a bundle)."""
    try:
        return paths.bundle_root() / "results"
    except Exception:  # pylint: disable=broad-except
        return Path.cwd() / "results"


def results_folder(out: os.PathLike, tag: str, card: str) -> Path:
    """Where a run of ``tag`` on ``card`` (a card slug) files its results: ``<out>/<tag>/<card>``."""
    return Path(out) / tag / card


def _trees(
    megatron: os.PathLike, vanilla: Optional[os.PathLike], base: Optional[os.PathLike]
) -> Dict[str, TreeInfo]:
    tree = inspect_tree(megatron, "--megatron")
    if not tree.patched:
        raise UsageError(
            f"--megatron {tree.path} is not patched (no {ADAPTER_RELPATH}): the suite measures "
            "the patched tree against the vanilla one",
            f"apply the series first (mla-seam apply {tree.path}), or pass this tree as "
            "--vanilla-megatron beside a patched one",
        )
    trees = {"patched": tree}
    if vanilla:
        van = inspect_tree(vanilla, "--vanilla-megatron")
        if van.patched:
            raise UsageError(
                f"--vanilla-megatron {van.path} carries the adapter ({ADAPTER_RELPATH})",
                "pass the vanilla tree of the same release (mla-seam upstream get --into DIR)",
            )
        if van.version != tree.version:
            log.warning(
                "mla-seam suite: vanilla %s is not the patched tree's release %s; the side-by-side "
                "numbers compare two releases",
                van.tag,
                tree.tag,
            )
        trees["vanilla"] = van
    if base:
        bas = inspect_tree(base, "--base-megatron")
        if bas.path == tree.path:
            # The release is its own base (the base release itself): its patched tree is the
            # reference, measured once; attribution reads the patched units as the base's.
            log.info(
                "mla-seam suite: %s is its own base; its patched tree serves as base", tree.tag
            )
            trees["base"] = tree
            return trees
        if not bas.patched:
            raise UsageError(
                f"--base-megatron {bas.path} is not patched",
                "the base tree is the patched tree of the base release (mla-seam apply DIR)",
            )
        trees["base"] = bas
    return trees


def run_suite(
    *,
    megatron: os.PathLike,
    vanilla: Optional[os.PathLike] = None,
    base: Optional[os.PathLike] = None,
    out: Optional[os.PathLike] = None,
    only: Optional[Sequence[str]] = None,
    update_goldens: bool = False,
    python: Optional[str] = None,
    pytest_args: Sequence[str] = (),
    device: Optional[DeviceInfo] = None,
    runner: Runner = run_phase,
    tests_dir: Optional[Path] = None,
) -> Tuple[Dict[str, Any], Path]:
    """Run the suite on up to three trees and write its results; returns ``(results, folder)``.

    ``device``, ``runner`` and ``tests_dir`` exist for tests (a probed device, a phase runner
    that does not start pytest, a folder of test files).

    Raises:
        DeviceError: No CUDA device visible.
        UsageError: Unknown phase in ``only``; a vanilla tree that is patched, a base tree that
            is not.
    """
    python = python or sys.executable
    trees = _trees(megatron, vanilla, base)
    tree = trees["patched"]
    roles = [r for r, t in trees.items() if not (r == "base" and t is tree)]
    units, unknown = select(only, roles)
    if unknown:
        choices = ", ".join(PHASE_NAMES)
        raise UsageError(
            f"unknown phase(s) {unknown}", f"choose from {choices} (a unit: PHASE@vanilla|base)"
        )
    device = device or device_mod.probe_device(python)
    device_mod.require_gpu(device)

    root_out = Path(out) if out else default_out()
    out_dir = results_folder(root_out, tree.tag, device.slug)
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = tests_dir or paths.gpu_tests_dir()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    phases: List[PhaseResult] = []
    records: List[Dict[str, Any]] = []
    golden: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mla-seam-suite-") as tmp:
        work = Path(tmp)
        for unit in units:
            result, recs, settled = _run_unit(
                unit, trees, device, tests, work, root_out, out_dir, update_goldens, python,
                pytest_args, runner,
            )  # fmt: skip
            phases.append(result)
            records.extend(recs)
            if settled is not None:
                golden[unit.role] = settled
    merged_from = None
    if only:
        previous = load_previous(out_dir / "results.json", trees, device)
        if previous is not None:
            phases, records, golden = merge_previous(previous, phases, records, golden)
            merged_from = previous.get("started")
    results = build_results(
        trees=trees,
        device=device,
        phases=phases,
        records=records,
        golden=golden,
        started=started,
        seconds=time.monotonic() - t0,
    )
    results["merged_from"] = merged_from
    results["verdict"] = folder_verdict(results, out_dir)
    write_outputs(out_dir, results)
    return results, out_dir


def _run_unit(
    unit: Unit,
    trees: Mapping[str, TreeInfo],
    device: DeviceInfo,
    tests: Path,
    work: Path,
    root_out: Path,
    out_dir: Path,
    update_goldens: bool,
    python: str,
    pytest_args: Sequence[str],
    runner: Runner,
) -> Tuple[PhaseResult, List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    tree = trees[unit.role]
    if unit.phase.optional and not (tests / unit.phase.file).is_file():
        reason = f"{unit.phase.file} is not in {tests}"
        return unavailable(unit, tree, reason), [], None
    if unit.phase.nproc > device.device_count:
        reason = f"needs {unit.phase.nproc} GPUs, {device.device_count} visible"
        return unavailable(unit, tree, reason), [], None
    env: Dict[str, str] = {}
    settle = None
    if unit.phase.golden:
        reference_dir = out_dir
        if unit.role == "base":
            reference_dir = results_folder(root_out, tree.tag, device.slug)
        env, settle = golden_phase(
            role=unit.role,
            out_dir=out_dir,
            reference_dir=reference_dir,
            results_root=root_out,
            tag=tree.tag,
            slug=device.slug,
            te_version=device.te,
            work=work,
            update=update_goldens,
        )
    result, recs = runner(unit, tree, python, tests, work, extra_env=env, pytest_args=pytest_args)
    return result, recs, (settle() if settle is not None else None)


def build_results(
    *,
    trees: Mapping[str, TreeInfo],
    device: DeviceInfo,
    phases: Sequence[PhaseResult],
    records: Sequence[Mapping[str, Any]],
    golden: Mapping[str, Any],
    started: str,
    seconds: float,
) -> Dict[str, Any]:
    """The ``results.json`` document (schema :data:`SCHEMA_VERSION`, without its verdict)."""
    tree = trees["patched"]
    patched_units = [p for p in phases if p.role == "patched"]
    golden_bad = any((golden.get(role) or {}).get("status") == "mismatch" for role in ("patched",))
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mla-seam-gpu-suite",
        "mla_seam_version": __version__,
        "started": started,
        "seconds": round(seconds, 1),
        "tag": tree.tag,
        "trees": {role: t.as_dict() for role, t in trees.items()},
        "environment": {
            "card": device.name,
            "card_slug": device.slug,
            "compute_capability": device.capability,
            "device_count": device.device_count,
            "memory_gib": device.memory_gib,
            **device_mod.versions(device),
        },
        "parallel": {
            "world_size": 1,
            "tensor_model_parallel": 1,
            "pipeline_model_parallel": 1,
            "virtual_pipeline_model_parallel": None,
            "context_parallel": 1,
            "expert_model_parallel": 1,
        },
        "ok": bool(patched_units) and all(p.ok for p in patched_units) and not golden_bad,
        "phases": [p.as_dict() for p in phases],
        "summary": summarize_cases(records),
        "golden": dict(golden),
        "bench_summary": summarize_bench(records, tree.version),
        "records": list(records),
    }


def load_previous(
    path: Path, trees: Mapping[str, TreeInfo], device: DeviceInfo
) -> Optional[Dict[str, Any]]:
    """An earlier ``results.json`` of the same tag, card, software and trees, or ``None``."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    env = previous.get("environment") or {}
    old_trees = previous.get("trees") or {}
    same = (
        previous.get("schema_version") == SCHEMA_VERSION
        and previous.get("tag") == trees["patched"].tag
        and env.get("card") == device.name
        and env.get("torch") == device.torch
        and env.get("transformer_engine") == device.te
        and all(
            old_trees[role].get("version") == tree.version
            for role, tree in trees.items()
            if role in old_trees
        )
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
    """Keep the earlier run's units (and their records, goldens) that this run did not repeat."""
    ran = {p.name for p in phases}
    kept = [
        PhaseResult.from_dict(p) for p in previous.get("phases") or [] if p.get("name") not in ran
    ]
    order = {
        unit_name(name, role): (i, ROLES.index(role))
        for i, name in enumerate(PHASE_NAMES)
        for role in ROLES
    }
    merged = sorted(kept + phases, key=lambda p: order.get(p.name, (len(order), 0)))
    old_records = [
        r
        for r in previous.get("records") or []
        if unit_name(str(r.get("phase")), str(r.get("role", "patched"))) not in ran
    ]
    merged_golden = {
        role: entry
        for role, entry in (previous.get("golden") or {}).items()
        if unit_name("golden", role) not in ran
    }
    merged_golden.update(golden)
    return merged, old_records + records, merged_golden


#: A results folder's multi-GPU run (``mla-seam suite --nproc N``), beside its suite run.
MULTIGPU_RESULTS = Path("multigpu") / "results.json"


def folder_verdict(results: Mapping[str, Any], folder: Path) -> Dict[str, Any]:
    """The verdict of a results folder (``<out>/<tag>/<card>``): its suite run ``results`` and
    the multi-GPU run beside it, whose base is the base release's multi-GPU run of the card.
    """
    own = _multigpu_run(folder / MULTIGPU_RESULTS, results.get("tag"))
    base = None
    base_tree = (results.get("trees") or {}).get("base") or {}
    if own and base_tree.get("tag") and not attribution.base_is_patched(results):
        base_folder = folder.parent.parent / str(base_tree["tag"]) / folder.name
        base = _multigpu_run(base_folder / MULTIGPU_RESULTS, base_tree["tag"])
    return attribution.build_verdict(results, own, base)


def _multigpu_run(path: Path, tag: Any) -> Optional[Dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("mla-seam suite: %s is not readable (%s): its cases are left out", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("tag") != tag:
        log.warning("mla-seam suite: %s is not a multi-GPU run of %s: left out", path, tag)
        return None
    return doc


def reattribute(folder: os.PathLike, out: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """Derive a stored run's verdict again with this version's attribution (no GPU needed).

    The measurements stay as they were; ``verdict.json``, ``results.md`` and the ``verdict`` of
    ``results.json`` are written again, and ``results.json`` records when and by which
    mla-seam: into the run's own folder, or with ``out`` into ``<out>/<tag>/<card>/`` (the
    stored run is then left as it was).

    Args:
        folder: A run's folder (``<out>/<tag>/<card>``) or its ``results.json``.
        out: A results folder to write to instead of the run's own.

    Raises:
        UsageError: No readable schema-2 ``results.json`` there.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"--reattribute {folder}: no readable results.json ({exc})",
            "pass a suite run's folder, e.g. results/core_v0.19.2/h200",
        ) from exc
    if (
        results.get("kind") != "mla-seam-gpu-suite"
        or results.get("schema_version") != SCHEMA_VERSION
    ):
        raise UsageError(
            f"--reattribute {folder}: not a schema-{SCHEMA_VERSION} suite run "
            f"(kind {results.get('kind')!r}, schema_version {results.get('schema_version')!r})",
            "only runs of the three-tree suite carry what attribution compares",
        )
    results["verdict"] = folder_verdict(results, path.parent)
    results["reattributed"] = {
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mla_seam_version": __version__,
    }
    target = path.parent
    if out is not None:
        target = results_folder(
            out, str(results.get("tag") or path.parent.parent.name), path.parent.name
        )
        if target.resolve() == path.parent.resolve():
            target = path.parent
        else:
            _copy_run_files(path.parent, target)
    write_outputs(target, results)
    return results


def _copy_run_files(source: Path, target: Path) -> None:
    """The files of a stored run that reattribution does not rewrite (golden values, logs)."""
    target.mkdir(parents=True, exist_ok=True)
    rewritten = {"results.json", "results.md", "bench.json", "verdict.json"}
    for item in source.iterdir():
        if item.name in rewritten:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target / item.name)


def write_outputs(out_dir: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, ``results.md``, ``bench.json`` and ``verdict.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(render_markdown(results), encoding="utf-8")
    bench_doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "mla-seam-gpu-bench",
        "tag": results["tag"],
        "trees": results["trees"],
        "environment": results["environment"],
        "parallel": results["parallel"],
        "summary": results["bench_summary"],
        "records": [
            r
            for r in results["records"]
            if str(r.get("case", "")).startswith("bench") or r.get("case") == "kernel_counts"
        ],
    }
    _write_json(out_dir / "bench.json", bench_doc)
    _write_json(out_dir / "verdict.json", results["verdict"])


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
