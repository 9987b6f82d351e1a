"""The GPU phase: the proposed series staged on each target and tested with attribution.

For every target the CPU phase marked for the GPU (``targets.json``), the three trees are
staged first, one target after the other (:func:`mla_seam.suite.trees.stage_target`: the
target's commit fetched from the upstream URL, patched with the proposal's bundle, the
vanilla tree beside it, the base release patched with the checked-in series), then one
``mla-seam suite`` process per target runs on each free GPU (:mod:`mla_seam.suite.fleet`).
``--gpu dry-run`` stages and checks the patched trees (``mla-seam apply --status``) without
running the suite: the CPU-only proof that the GPU job would test what was proposed.

Verdicts land in ``<out>/gpu/verdicts.json`` (the report phase posts them).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from mla_seam.errors import SeamError
from mla_seam.nightly.job import Job, JobBroke, Step

SUITE_ESTIMATE_S = 900


@functools.lru_cache(maxsize=1)
def _probe() -> Any:
    from mla_seam.suite import device  # pylint: disable=import-outside-toplevel

    return device.probe_device(sys.executable)


def gpu_available() -> Optional[str]:
    """``None`` when a CUDA device is visible, else why not (the note in the summary)."""
    info = _probe()
    if info.cuda:
        return None
    return info.error or f"torch {info.torch} sees no CUDA device"


def load_plan(out: Path) -> Dict[str, Any]:
    """``targets.json`` of the CPU phase.

    Raises:
        JobBroke: there is none (the CPU phase did not run into this folder).
    """
    path = out / "targets.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobBroke(f"no readable {path} ({exc}): run the cpu phase first (same --out)")


def bundle_of(out: Path, target: Dict[str, Any]) -> Optional[Path]:
    """The bundle the target's patched tree gets: its proposal's, else the installed one."""
    proposal = target.get("proposal")
    if proposal and proposal.get("ok"):
        return out / proposal["folder"] / "bundle"
    return None


def stage_all(
    out: Path, plan: Dict[str, Any], chosen: Sequence[Dict[str, Any]], work: Path
) -> Dict[str, Dict[str, Any]]:
    """Stage every chosen target's trees; ``{slug: {"trees": {...}} or {"error": ...}}``."""
    from mla_seam.suite import trees  # pylint: disable=import-outside-toplevel

    drift_json = out / "drift" / "drift.json"
    staged: Dict[str, Dict[str, Any]] = {}
    for target in chosen:
        try:
            base = trees.choose_base(
                target["version"], base_from=drift_json if drift_json.is_file() else None
            )
            got = trees.stage_target(
                target["name"],
                target["commit"],
                work,
                plan.get("upstream_url"),
                bundle_of(out, target),
                base,
                version=target["version"],
            )
            staged[target["slug"]] = {"trees": {k: str(v) for k, v in got.items()}, "base": base}
        except SeamError as err:
            staged[target["slug"]] = {"error": f"staging failed: {err.message}"}
    return staged


def check_patched(tree: Path, bundle: Optional[Path]) -> str:
    """``mla-seam apply --status`` of a staged patched tree with its bundle: the dry run's
    verdict (``staged``) or why not."""
    env = dict(os.environ)
    if bundle is not None:
        env["MLA_SEAM_ROOT"] = str(bundle)
    proc = subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", "--status", str(tree)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    text = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        return "staged"
    return f"staging broke: apply --status exit {proc.returncode}: {' / '.join(text[-2:])}"


#: Attributions worth a line in the comment (absorbed and unchanged findings are counted only).
NOTABLE = ("overlay broke", "upstream changed", "unattributed")


def notable(verdict: Dict[str, Any], limit: int = 20) -> list:
    """``attribution: cause`` of the findings a reviewer has to read, at most ``limit``."""
    rows = [
        f"{f.get('attribution')}: {f.get('cause') or f.get('subject')}"
        for f in verdict.get("findings") or []
        if isinstance(f, dict) and f.get("attribution") in NOTABLE
    ]
    return rows[:limit]


def run_suites(
    staged: Dict[str, Dict[str, Any]], results: Path, work: Path, devices: Sequence[int]
) -> Dict[str, Dict[str, Any]]:
    """One suite process per staged target over ``devices``; ``{slug: verdict record}``."""
    from mla_seam.suite import fleet  # pylint: disable=import-outside-toplevel

    jobs = []
    for slug, info in staged.items():
        if "trees" not in info:
            continue
        trees = info["trees"]
        argv = [sys.executable, "-m", "mla_seam", "suite", "--out", str(results / slug)]
        for role, flag in (("patched", "--megatron"), ("vanilla", "--vanilla-megatron"),
                           ("base", "--base-megatron")):  # fmt: skip
            if role in trees:
                argv += [flag, trees[role]]
        jobs.append(fleet.Job(slug, argv, estimate=SUITE_ESTIMATE_S))
    records: Dict[str, Dict[str, Any]] = {}
    for job in fleet.run_jobs(jobs, devices, work / "logs"):
        found = sorted((results / job.name).glob("*/*/verdict.json"))
        if found:
            verdict = json.loads(found[-1].read_text(encoding="utf-8"))
            records[job.name] = {
                "verdict": verdict.get("verdict"),
                "counts": verdict.get("counts") or {},
                "findings": notable(verdict),
                "card": found[-1].parent.name,
            }
        else:
            records[job.name] = {
                "verdict": "none",
                "error": f"no verdict (suite exit {job.rc}): {job.tail(2)}",
            }
    return records


def run(job: Job, args: Any) -> Dict[str, Dict[str, Any]]:
    """The GPU phase into ``job``; the verdict records (also in ``<out>/gpu/verdicts.json``)."""
    verdicts: Dict[str, Dict[str, Any]] = {}

    def gpu_step(step: Step) -> None:
        plan = load_plan(job.out)
        chosen = [t for t in plan["targets"] if (t.get("gpu") or {}).get("run")]
        wanted = [t for t in (args.targets or "").split(",") if t]
        if wanted:
            chosen = [t for t in plan["targets"] if t["slug"] in wanted or t["name"] in wanted]
        job.gpu_targets = [t["slug"] for t in chosen]
        if not chosen:
            step.status, step.note = "skipped", "no target changed since its last GPU run"
            return
        mode = args.gpu
        why = None if mode in ("on", "dry-run") else gpu_available()
        if mode == "off" or why:
            step.status = "skipped"
            step.note = "--gpu off" if mode == "off" else f"no GPU here: {why}"
            job.notes.append(f"GPU suite not run ({step.note}); the CPU report stands alone")
            return
        work = job.out / "gpu" / "trees"
        staged = stage_all(job.out, plan, chosen, work)
        by_slug = {t["slug"]: t for t in chosen}
        if mode == "dry-run":
            for slug, info in staged.items():
                if "trees" in info:
                    bundle = bundle_of(job.out, by_slug[slug])
                    patched = Path(info["trees"]["patched"])
                    verdicts[slug] = {"verdict": check_patched(patched, bundle)}
        else:
            devices = list(range(_probe().device_count or 1))
            verdicts.update(run_suites(staged, job.out / "gpu" / "results", work, devices))
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for slug, info in staged.items():
            record = verdicts.setdefault(slug, {"verdict": "none", "error": info.get("error")})
            target = by_slug[slug]
            record.update(
                target=target["name"],
                commit=target["commit"],
                fingerprint=(target.get("gpu") or {}).get("fingerprint"),
                base=info.get("base"),
                trees=info.get("trees"),
                series="proposal" if bundle_of(job.out, target) else "checked-in",
                at=now,
                dry_run=mode == "dry-run",
            )
        folder = job.out / "gpu"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "verdicts.json").write_text(
            json.dumps(verdicts, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        job.gpu_verdicts = {s: str(v.get("verdict")) for s, v in verdicts.items()}
        broke = [s for s, v in verdicts.items() if v.get("verdict") == "overlay_broke"]
        job.overlay_broke = sorted(set(job.overlay_broke) | set(broke))
        failed = {
            s: v.get("error") or v["verdict"]
            for s, v in verdicts.items()
            if v.get("error") or str(v.get("verdict")).startswith("staging broke")
        }
        step.note = ", ".join(f"{s} {v.get('verdict')}" for s, v in verdicts.items())
        if failed:
            raise JobBroke("no verdict for " + ", ".join(f"{s} ({w})" for s, w in failed.items()))

    job.step("gpu", gpu_step)
    return verdicts
