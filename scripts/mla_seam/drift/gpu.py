"""GPU verdicts in the drift report: each tag's ``gpu`` slot from ``mla-seam suite`` results.

``--gpu-results DIR`` names a results folder (``<DIR>/<tag>/<card>/verdict.json``, written by the
three-tree suite). A tag takes the verdict of its tag folder, else of the folder whose patched
tree has the tag's version (upstream's tag ``core_v0.19.0`` says 0.19.1 in package_info.py);
with several cards, the newest run. The slot holds the verdict, card, versions, timestamp, the
trees, the attribution counts, the reasons, every finding that moved, the performance findings
(for the per-tag ratio plot) and the golden curves of the folder (for the curve plot).

A moving target's row (``main``, ``origin/dev``, the nightly's ``upstream-main``:
:func:`mla_seam.releases.moving_target`) takes the verdict of ``<DIR>/<target>/`` only (dev's
package_info says 0.19.0, which is no release of it); without one its row says so (never a
pass, :data:`mla_seam.drift.render.NO_GPU_VERDICT`).

A GPU verdict of ``overlay_broke`` or ``upstream_changed`` makes the tag ``needs_work`` with a
``GPU:`` reason: drift is behaviour too. ``pass`` and ``incomplete`` leave the verdict alone
(``incomplete`` says why in the slot).

The multi-GPU run of the same folder (``multigpu/results.json``, ``mla-seam suite --nproc N``)
is summarized in the slot's ``multigpu`` (cases run, the failing ones with their checks and
what the vanilla tree did). Its cases are already findings of the folder's verdict
(:func:`mla_seam.suite.attribution.build_verdict`), the one place that decides whether a
failure is the overlay's, upstream's or standing; a ``verdict.json`` that does not record the
multi-GPU run beside it is stale, and the report says so (re-derive it with
``mla-seam suite --reattribute FOLDER``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from mla_seam.drift.sweep import NEEDS_WORK, refresh
from mla_seam.releases import MOVING_TARGETS, moving_target

log = logging.getLogger(__name__)

VERDICT_FILE = "verdict.json"
NEEDS_WORK_VERDICTS = ("overlay_broke", "upstream_changed")
_MOVED_LIMIT = 40


def find_verdicts(results_dir: Path) -> Dict[str, List[Path]]:
    """``{version: [verdict.json, ...]}`` under ``results_dir`` (any tag folder, any card)."""
    found: Dict[str, List[Path]] = {}
    for path in sorted(Path(results_dir).glob(f"*/*/{VERDICT_FILE}")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("mla-seam drift: skipping %s (%s)", path, exc)
            continue
        if doc.get("kind") != "mla-seam-gpu-verdict":
            continue
        folder = path.parent.parent.name
        if folder not in MOVING_TARGETS:  # dev says 0.19.0: its results are not that release's
            found.setdefault(str(doc.get("version")), []).append(path)
        found.setdefault(folder, []).append(path)
    return found


def _newest(paths: List[Path]) -> Optional[Dict[str, Any]]:
    docs = []
    for path in paths:
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["_path"] = path
        docs.append(doc)
    return max(docs, key=lambda d: str(d.get("timestamp"))) if docs else None


def _golden_curves(folder: Path) -> Dict[str, Dict[str, List[float]]]:
    """``{role: {metric: [value per step]}}`` from the golden-values files of one results folder."""
    curves: Dict[str, Dict[str, List[float]]] = {}
    for path in sorted(folder.glob("golden_values_*.json")):
        if path.name.endswith(".observed.json"):
            continue
        role = "vanilla" if path.name.endswith(".vanilla.json") else "patched"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        curves[role] = {
            metric: [float(entry["values"][k]) for k in sorted(entry["values"], key=int)]
            for metric, entry in sorted(doc.items())
        }
    return curves


def multigpu_summary(folder: Path) -> Optional[Dict[str, Any]]:
    """The multi-GPU run of a results folder: world size, when, cases run and the failing ones."""
    path = folder / "multigpu" / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cases = doc.get("cases") or []
    failed = []
    for case in cases:
        patched, vanilla = case.get("patched") or {}, case.get("vanilla") or {}
        if patched.get("ok", True):
            continue
        failed.append(
            {
                "case": str(case.get("name")),
                "checks": list(patched.get("failed_checks") or []),
                "message": str(patched.get("message") or ""),
                "vanilla": _vanilla_outcome(vanilla),
            }
        )
    return {
        "world_size": (doc.get("parallel") or {}).get("world_size"),
        "timestamp": doc.get("started"),
        "cases": len(cases),
        "failed": failed,
    }


def _vanilla_outcome(vanilla: Dict[str, Any]) -> str:
    if vanilla.get("ok"):
        return "passes"
    if vanilla.get("outcome") == "ran":
        return "fails alike (" + (", ".join(vanilla.get("failed_checks") or ()) or "ran") + ")"
    return str(vanilla.get("outcome") or "not run")


def multigpu_passed(multigpu: Mapping[str, Any]) -> str:
    """A :func:`multigpu_summary` in a table cell: ``2 GPUs 6/12`` (cases passed of run)."""
    ok = multigpu["cases"] - len(multigpu["failed"])
    return f"{multigpu.get('world_size')} GPUs {ok}/{multigpu['cases']}"


def multigpu_failure(failed: Mapping[str, Any]) -> str:
    """One failing multi-GPU case of :func:`multigpu_summary`, in words (reasons and drift.md)."""
    why = ", ".join(failed["checks"]) or failed["message"] or "failed"
    return f"{failed['case']} fails on the patched tree ({why}); vanilla: {failed['vanilla']}"


def stale_verdict(doc: Mapping[str, Any], multigpu: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why a verdict document does not speak for its folder's multi-GPU run, or ``None``."""
    recorded = (doc.get("multigpu") or {}).get("started")
    found = (multigpu or {}).get("timestamp")
    if recorded == found:
        return None
    folder = doc["_path"].parent
    return (
        f"{folder}/{VERDICT_FILE} was derived {'without' if not recorded else 'before'} the "
        f"multi-GPU run beside it ({found or 'none now'}): run mla-seam suite --reattribute {folder}"
    )


def slot(doc: Dict[str, Any], root: Path) -> Dict[str, Any]:
    """The ``gpu`` slot of a tag from its verdict document."""
    path: Path = doc["_path"]
    findings = doc.get("findings") or []
    moved = [f for f in findings if f.get("attribution") != "unchanged"]
    try:
        rel = str(path.parent.relative_to(root))
    except ValueError:
        rel = str(path.parent)
    found = {
        "verdict": doc["verdict"],
        "card": doc.get("card"),
        "card_slug": doc.get("card_slug"),
        "timestamp": doc.get("timestamp"),
        "versions": doc.get("versions"),
        "trees": doc.get("trees"),
        "counts": doc.get("counts"),
        "reasons": list(doc.get("reasons") or [])[:20],
        "moved": moved[:_MOVED_LIMIT],
        "moved_total": len(moved),
        "performance": [
            {"subject": f["subject"], "metric": f["metric"], "values": f["values"]}
            for f in findings
            if f.get("category") == "performance"
        ],
        "golden": _golden_curves(path.parent),
        "results": rel,
    }
    multigpu = multigpu_summary(path.parent)
    if multigpu is not None:
        found["multigpu"] = multigpu
    return found


def attach(report: Dict[str, Any], results_dir: Path) -> int:
    """Fill the ``gpu`` slot of every tag that has a verdict; return how many got one."""
    root = Path(results_dir)
    found = find_verdicts(root)
    attached = 0
    cards, versions = set(), []
    for entry in report["tags"]:
        target = moving_target(str(entry["tag"]))  # main, origin/dev: results/<target> only
        if target:
            paths = found.get(target)
        else:
            paths = found.get(str(entry["tag"])) or found.get(str(entry["version"]))
        doc = _newest(paths or [])
        if doc is None:
            continue
        entry["gpu"] = slot(doc, root)
        attached += 1
        cards.add(doc.get("card"))
        if doc.get("versions") not in versions:
            versions.append(doc.get("versions"))
        if doc["verdict"] in NEEDS_WORK_VERDICTS:
            entry["verdict"] = NEEDS_WORK
            reasons = doc.get("reasons") or [doc["verdict"]]
            entry["reasons"] = list(entry["reasons"]) + [
                f"GPU ({doc.get('card_slug')}, {doc['verdict']}): {r}" for r in reasons[:5]
            ]
        stale = stale_verdict(doc, entry["gpu"].get("multigpu"))
        if stale:
            log.warning("mla-seam drift: %s", stale)
            entry["gpu"]["stale"] = stale
    report["run"]["cards"] = sorted(c for c in cards if c)
    report["run"]["versions"] = versions
    refresh(report)
    return attached
