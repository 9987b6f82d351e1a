"""``drift.md`` and ``drift.html``: the report for people, leading with what changed."""

from __future__ import annotations

import html
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mla_seam import contracts, releases
from mla_seam.drift.gpu import multigpu_failure, multigpu_passed
from mla_seam.drift.sweep import SUPPORTED

_SHORT = {
    "exact": "exact",
    "offset": "offset",
    "three_way": "3-way",
    "conflict": "CONFLICT",
    "upstream": "upstream",
    "obsolete": "obsolete",
}


def _patches(entry: Dict[str, object], baseline: bool) -> List[Dict[str, object]]:
    if baseline:
        return entry["baseline"]["patches"] if entry.get("baseline") else []  # type: ignore
    return entry["patches"]  # type: ignore[return-value]


def _hooks(entries: Sequence[Dict[str, object]], baseline: bool = False) -> List[str]:
    found = {p["hook"] for e in entries for p in _patches(e, baseline)}
    return sorted(found, key=lambda h: (len(str(h)), str(h)))


def _cell(entry: Dict[str, object], hook: str, baseline: bool = False) -> Tuple[str, str]:
    """``(class, text)`` of one hook at one tag (``("", "-")`` when the series lacks it)."""
    for p in _patches(entry, baseline):
        if p["hook"] == hook:
            text = _SHORT[p["class"]]
            if p["class"] == "offset":
                text = "offset " + ",".join(f"{o:+d}" for o in p["offsets"])
            return p["class"], text
    return "", "-"


def _since(doc: Mapping[str, Any]) -> List[str]:
    since = doc.get("since_previous")
    if not since:
        return [
            "## Since the previous run",
            "",
            "No earlier run recorded (first run or no --history).",
            "",
        ]
    out = [f"## Since the previous run ({since['previous_timestamp']})", ""]
    if since["new_tags"]:
        out.append(f"- new: {', '.join(since['new_tags'])}")
    if since["removed_tags"]:
        out.append(f"- gone: {', '.join(since['removed_tags'])}")
    for row in since["changed"]:
        out.append(f"- {row['tag']}: {'; '.join(row['changes'])}")
    if len(out) == 2:
        out.append("- nothing changed")
    return out + [""]


#: The GPU cell of a moving target's row (main, dev) that has no verdict: never read as a pass.
NO_GPU_VERDICT = "no GPU verdict yet"


def _gpu_cell(entry: Mapping[str, Any]) -> str:
    gpu = entry.get("gpu")
    if not gpu:
        return NO_GPU_VERDICT if releases.moving_target(str(entry["tag"])) else "-"
    cell = f"{gpu['verdict']} ({gpu.get('card_slug')})"
    multigpu = gpu.get("multigpu")
    if multigpu:
        cell += f"; {multigpu_passed(multigpu)}"
    if gpu.get("stale"):
        cell += " (stale verdict.json: re-derive it with --reattribute)"
    return cell


def markdown(doc: Dict[str, object], trend: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """``drift.md``: what changed, the matrix, per-line summary, contracts, reasons, GPU, trend."""
    entries: List[Dict[str, object]] = doc["tags"]  # type: ignore[assignment]
    hooks = _hooks(entries)
    summary = doc["summary"]
    out = [
        f"# mla-seam drift: {doc['range']}",
        "",
        f"Schema version {doc['schema_version']}, {doc['tool']}. "
        f"{summary['supported']} of {summary['tags']} tags supported"  # type: ignore[index]
        + (
            f"; needs work: {', '.join(summary['needs_work_tags'])}."  # type: ignore[index]
            if summary["needs_work"]  # type: ignore[index]
            else "."
        ),
        "",
        _run_line(doc),
        "",
    ]
    out += _since(doc)
    out += [
        "## Matrix",
        "",
        "Patch classes: exact, offset (moved by N lines), 3-way (merged, review), CONFLICT, "
        "upstream (already in the tag), obsolete (its Obsolete-If holds), - (not in the series). "
        "GPU: the three-tree suite's verdict (pass, upstream_changed, overlay_broke, incomplete; "
        f"- none; a moving target's row says {NO_GPU_VERDICT} until the results hold one of its "
        "own).",
        "",
        "| tag | series | " + " | ".join(hooks) + " | contract changes | GPU | verdict |",
        "|---|---|" + "---|" * len(hooks) + "---|---|---|",
    ]
    for e in entries:
        cells = [_cell(e, h)[1] for h in hooks]
        served = e["series"] if e["served"] else f"({e['series']})"
        out.append(
            f"| {e['tag']} | {served} | "
            + " | ".join(cells)
            + f" | {len(e['contract_changes'])} | {_gpu_cell(e)} | {e['verdict']} |"  # type: ignore
        )
    if doc.get("baseline"):
        base_hooks = _hooks(entries, True)
        out += [
            "",
            f"## Drift of the {doc['baseline']} hooks across the range",
            "",
            f"Each tag surveyed with the {doc['baseline']} series, as `mla-seam rebase --from` "
            "would: how its hooks moved, merged, conflicted or became obsolete.",
            "",
            "| tag | " + " | ".join(base_hooks) + " |",
            "|---|" + "---|" * len(base_hooks),
        ]
        for e in entries:
            cells = [_cell(e, h, True)[1] for h in base_hooks]
            out.append(f"| {e['tag']} | " + " | ".join(cells) + " |")
    basis = f"the {doc['baseline']} hooks" if doc.get("baseline") else "the serving series"
    out += ["", "## Per release line", "", f"Patch classes of {basis} on the line's tags.", ""]
    for line, row in doc["lines"].items():  # type: ignore[union-attr]
        out.append(f"### {line} ({row['series']}: {', '.join(row['tags'])}) - {row['verdict']}")
        out.append("")
        for label, key in (
            ("apply exactly", "exact"),
            ("moved (offset)", "offset"),
            ("needed a 3-way merge", "three_way"),
            ("conflict", "conflict"),
            ("already upstream", "upstream"),
            ("obsolete (left out of the series)", "obsolete"),
        ):
            if row[key]:
                out.append(f"- {label}: {', '.join(row[key])}")
        if row.get("line_only"):
            out.append(f"- hooks only this line's series has: {', '.join(row['line_only'])}")
        changed = row["contracts_changed"]
        out.append(f"- contracts changed: {', '.join(changed) if changed else 'none'}")
        out.append("")
    out += ["## Contract changes (against the previous tag)", ""]
    for e in entries:
        if e["contract_changes"]:
            out.append(f"### {e['tag']} (since {e['contract_changes'][0]['since']})")  # type: ignore[index]
            out.append("")
            for c in e["contract_changes"]:  # type: ignore[union-attr]
                change = contracts.Change(c["probe"], c["old"], c["new"], c["key"], c["reason"])
                out.append(f"- `{change.describe()}`")
            out.append("")
    reasons = [e for e in entries if e["reasons"]]
    if reasons:
        out += ["## Why tags need work", ""]
        for e in reasons:
            out.append(f"### {e['tag']}")
            out.append("")
            out += [f"- {r}" for r in e["reasons"]]  # type: ignore[union-attr]
            out.append("")
    out += _gpu_sections(entries)
    out += _trend(trend)
    out += ["## Probes", ""]
    for p in doc["probes"]:  # type: ignore[union-attr]
        checked = "checked" if p["checked"] else "informational"
        out.append(f"- `{p['name']}` ({p['file']}, {checked}): {p['description']}")
    return "\n".join(out).rstrip() + "\n"


_COLORS = {
    "exact": "#2e7d32",
    "offset": "#81c784",
    "three_way": "#fbc02d",
    "conflict": "#d32f2f",
    "upstream": "#1976d2",
    "obsolete": "#9e9e9e",
    "": "#ffffff",
}


def html_table(doc: Dict[str, object]) -> str:
    """``drift.html``: what changed, then one row per tag, coloured (no dependencies)."""
    entries: List[Dict[str, Any]] = doc["tags"]  # type: ignore[assignment]
    hooks = _hooks(entries)
    head = "".join(f"<th>{h}</th>" for h in hooks)
    rows = []
    for e in entries:
        cells = []
        for hook in hooks:
            cls, text = _cell(e, hook)
            cells.append(f'<td style="background:{_COLORS[cls]}">{html.escape(text)}</td>')
        good = e["verdict"] == SUPPORTED
        gpu = e.get("gpu") or {}
        gpu_color = _GPU_COLORS.get(gpu.get("verdict"), "#f5f5f5")
        reasons = "<br>".join(html.escape(r) for r in e["reasons"][:3])
        rows.append(
            f"<tr><th>{html.escape(str(e['tag']))}</th>{''.join(cells)}"
            f"<td>{len(e['contract_changes'])}</td>"
            f'<td style="background:{gpu_color}">{html.escape(_gpu_cell(e))}</td>'
            f'<td style="background:{"#c8e6c9" if good else "#ffcdd2"}">{e["verdict"]}</td>'
            f'<td style="font-size:smaller">{reasons}</td></tr>'
        )
    since = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _since(doc) if line[:2] == "- ")
    return (
        "<!doctype html><meta charset=utf-8><title>mla-seam drift</title>"
        f"<h1>mla-seam drift: {html.escape(str(doc['range']))}</h1>"
        f"<p>{html.escape(_run_line(doc))}</p>"
        f"<h2>Since the previous run</h2><ul>{since or '<li>no earlier run recorded</li>'}</ul>"
        '<table border=1 cellspacing=0 cellpadding=4 style="font-family:monospace">'
        f"<tr><th>tag</th>{head}<th>contract changes</th><th>GPU</th><th>verdict</th>"
        f"<th>reasons</th></tr>{''.join(rows)}</table>\n"
    )


_GPU_COLORS = {
    "pass": "#c8e6c9",
    "upstream_changed": "#ffe0b2",
    "overlay_broke": "#ffcdd2",
    "incomplete": "#eeeeee",
}


def _run_line(doc: Mapping[str, Any]) -> str:
    run = doc.get("run") or {}
    cards = ", ".join(run.get("cards") or []) or "none (CPU sweep only)"
    versions = "; ".join(
        ", ".join(f"{k} {v}" for k, v in sorted(vs.items()) if v)
        for vs in run.get("versions") or []
    )
    pre = "included" if run.get("prereleases") else "skipped"
    skipped = run.get("skipped_prereleases") or []
    return (
        f"Run {run.get('timestamp')}; GPU cards: {cards}"
        + (f" ({versions})" if versions else "")
        + f"; pre-releases {pre}"
        + (f" ({len(skipped)}: {', '.join(skipped)})" if skipped else "")
        + "."
    )


def _waiting(entries: Sequence[Mapping[str, Any]]) -> List[str]:
    """A line per moving target's row without a GPU verdict (where the suite would file one)."""
    out = []
    for e in entries:
        target = releases.moving_target(str(e["tag"]))
        if target and not e.get("gpu"):
            out.append(
                f"- {e['tag']}: {NO_GPU_VERDICT} (the suite files it as "
                f"<DIR>/{target}/<card>/verdict.json)"
            )
    return out + [""] if out else []


def _gpu_sections(entries: Sequence[Mapping[str, Any]]) -> List[str]:
    with_gpu = [e for e in entries if e.get("gpu")]
    if not with_gpu:
        return [
            "## GPU verdicts",
            "",
            "No GPU results attached (mla-seam drift --gpu-results DIR; the three-tree suite "
            "writes <DIR>/<tag>/<card>/verdict.json).",
            "",
        ] + _waiting(entries)
    out = ["## GPU verdicts", ""]
    out.append("| tag | card | verdict | " + " | ".join(_ATTRIBUTIONS) + " | trees |")
    out.append("|---|---|---|" + "---|" * len(_ATTRIBUTIONS) + "---|")
    for e in with_gpu:
        gpu = e["gpu"]
        counts = gpu.get("counts") or {}
        trees = ", ".join(
            f"{role} {t['version']}" for role, t in (gpu.get("trees") or {}).items() if t.get("ran")
        )
        out.append(
            f"| {e['tag']} | {gpu.get('card')} | {gpu['verdict']} | "
            + " | ".join(str(counts.get(a, 0)) for a in _ATTRIBUTIONS)
            + f" | {trees} |"
        )
    out.append("")
    out += _waiting(entries)
    failing = []
    for e in with_gpu:
        multigpu = e["gpu"].get("multigpu") or {}
        failing += [
            f"- {e['tag']}, {multigpu.get('world_size')} GPUs ({multigpu.get('timestamp')}): "
            + multigpu_failure(failed)
            for failed in multigpu.get("failed") or ()
        ]
    if failing:
        out += failing + [""]
    for e in with_gpu:
        gpu = e["gpu"]
        if not gpu.get("moved"):
            continue
        out += [f"### {e['tag']} on {gpu.get('card')} ({gpu.get('timestamp')})", ""]
        for f in gpu["moved"]:
            mark = " **regressed**" if f.get("regressed") else ""
            out.append(f"- {f['category']}, {f['attribution']}{mark}: {f['cause']}")
        if gpu.get("moved_total", 0) > len(gpu["moved"]):
            out.append(f"- ... {gpu['moved_total'] - len(gpu['moved'])} more in {gpu['results']}")
        out.append("")
    return out


_ATTRIBUTIONS = ("upstream changed", "overlay broke", "absorbed", "unchanged", "unattributed")


def _trend(trend: Optional[Sequence[Mapping[str, Any]]]) -> List[str]:
    if not trend or len(trend) < 2:
        return []
    out = ["## Trend (history file)", "", "| run | tags | supported | needs work | GPU verdicts |"]
    out.append("|---|---|---|---|---|")
    for row in trend:
        gpu = ", ".join(f"{k} {v}" for k, v in sorted((row.get("gpu_by_verdict") or {}).items()))
        out.append(
            f"| {row['timestamp']} | {row['tags']} | {row['supported']} | {row['needs_work']} | "
            f"{gpu or '-'} |"
        )
    return out + [""]
