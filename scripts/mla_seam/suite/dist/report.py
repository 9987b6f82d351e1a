"""Goldens per layout, the results document and its markdown."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mla_seam import __version__
from mla_seam.suite import goldens
from mla_seam.suite.dist.cases import KIND, SIDES, Case
from mla_seam.suite.render import fmt_value
from mla_seam.suite.runner import SCHEMA_VERSION

log = logging.getLogger(__name__)

# --- goldens and results -------------------------------------------------------------------------


def golden_name(slug: str, te: Optional[str], layout: str) -> str:
    """``golden_values_<card>_te<TE>_<layout>.json``."""
    return goldens.golden_filename(slug, te).replace(".json", f"_{layout}.json")


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
        doc = goldens.golden_document(metrics)
        committed = folder / name
        if record.get("deterministic") is False:
            # Two trainings in one process differed: nothing to hold a later run to.
            info["status"] = "nondeterministic"
            goldens.write_golden(committed.with_suffix(".observed.json"), doc)
        elif committed.is_file() and not update:
            problems = goldens.compare_golden_exact(doc, goldens.read_golden(committed))
            info["problems"] = problems
            info["status"] = "mismatch" if problems else "matched"
            if problems:
                goldens.write_golden(committed.with_suffix(".observed.json"), doc)
        else:
            info["status"] = "updated" if committed.is_file() else "recorded"
            goldens.write_golden(committed, doc)
        cross = {}
        for path in sorted(root.glob(f"*/{device.slug}/multigpu/{name}")):
            other = path.parent.parent.parent.name
            if other != tag:
                cross[other] = goldens.compare_golden_cross(doc, goldens.read_golden(path))
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
            if "when" in case.known_issue:
                row["known_issue_when"] = case.known_issue["when"]
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
        "schema_version": SCHEMA_VERSION,
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
    fmt = fmt_value
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
        if row.get("known_issue_when"):
            known += f" (where {row['known_issue_when']})"
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
