"""The ``drift`` verb: how every upstream tag in a range relates to the series and the adapter.

::

    mla-seam drift --megatron DIR --tags FROM..TO [--out DIR] [--no-plot]

For each tag in the range (every known release between FROM and TO, plus DIR's own
``core_vX.Y.Z`` tags there; TO may also be any ref of DIR, such as ``main``) the sweep runs the
``rebase`` survey of the series that serves the tag (or, for a release no series lists, the
line a rebase would start from), reads the contract probes, and gives a verdict:

* ``supported``: a series lists the release, every patch applies strictly (exact or offset),
  the pre-images are the ones the manifest recorded, and every probed contract has a value the
  adapter handles;
* ``needs_work``: anything else, with the reasons.

DIR may be any Megatron checkout or folder: tags it lacks are materialized into the mla-seam
cache (``mla-seam upstream``) and fetched into a scratch repository; DIR is never written.

Outputs (``--out``): ``drift.json`` (schema ``schemas/drift.schema.json``, ``schema_version``
1), ``drift.md``, ``drift.png`` (matplotlib, the ``plot`` extra) and ``drift.html`` (no
dependency). The exit status is 17 (:class:`~mla_seam.errors.DriftFoundError`) when any tag
needs work, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mla_seam import __version__, contracts, gitlayer, paths, releases, upstream
from mla_seam.errors import DriftFoundError, SeamError, UsageError
from mla_seam.series import Series, json_bytes, series_by_name
from mla_seam.survey import (
    PatchClass,
    Survey,
    Workspace,
    load_lines,
    series_for,
    survey,
    version_at,
)
from mla_seam.tree import MegatronTree

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "drift.schema.json"
SUPPORTED, NEEDS_WORK = "supported", "needs_work"
_SHORT = {
    "exact": "exact",
    "offset": "offset",
    "three_way": "3-way",
    "conflict": "CONFLICT",
    "upstream": "upstream",
    "obsolete": "obsolete",
}


def _emit(text: str) -> None:
    """The one place result lines are written to stdout."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


# --- the range ---------------------------------------------------------------------------------


def _endpoint(text: str, first: bool) -> Optional[str]:
    """The release an endpoint names (a line means its oldest/newest release), else ``None``."""
    try:
        version = upstream.version_for(text)
    except SeamError:
        return None
    line = upstream.line_of(version)
    bare = text.strip().removeprefix(upstream.TAG_PREFIX).removeprefix("v")
    if bare.count(".") == 1:  # a line: from its first release, to its last
        members = [v for v in upstream.RELEASES if upstream.line_of(v) == line]
        return members[0] if first else members[-1]
    return version


def tags_in_range(ws: Workspace, spec: str) -> List[str]:
    """The refs a ``FROM..TO`` range names, oldest first.

    Raises:
        UsageError: the range is malformed or empty.
        UpstreamError: an endpoint is neither a known release nor a ref of the checkout.
    """
    start, sep, end = spec.partition("..")
    if not sep or not start or not end:
        raise UsageError(
            f"--tags {spec!r} is not FROM..TO", "e.g. --tags core_v0.13.1..core_v0.19.2"
        )
    low, high = _endpoint(start, True), _endpoint(end, False)
    extra_end = None
    if low is None:
        ws.resolve(start)  # raises UpstreamError with the known releases
        low = version_at(ws.repo, ws.resolve(start)[0])
    if high is None:
        extra_end = end
        ws.resolve(end)
        high = None
    versions = set(v for v in upstream.RELEASES if _in(v, low, high))
    for tag in gitlayer.tags_at(ws.repo):
        version = tag.removeprefix(upstream.TAG_PREFIX)
        if tag.startswith(upstream.TAG_PREFIX) and _in(version, low, high):
            versions.add(version)
    refs = [f"{upstream.TAG_PREFIX}{v}" for v in sorted(versions, key=releases.version_key)]
    if extra_end:
        refs.append(extra_end)
    if not refs:
        raise UsageError(f"--tags {spec}: no release in that range", "widen the range")
    return refs


def _in(version: str, low: str, high: Optional[str]) -> bool:
    key = releases.version_key(version)
    if key[0] != 0:
        return False
    return releases.version_key(low) <= key and (high is None or key <= releases.version_key(high))


# --- one tag -----------------------------------------------------------------------------------


def _preimage_problems(ws: Workspace, s: Series, version: str, commit: str) -> List[str]:
    images = s.images_for(version)
    blobs = gitlayer.tree_blobs(ws.repo, commit, list(images))
    problems = []
    for rel, options in images.items():
        if blobs.get(rel) not in {img.pre for img in options}:
            problems.append(
                f"{rel} at {version} is not a pre-image {s.name} recorded (apply would refuse); "
                f"re-export the line with mla-seam rebase --write"
            )
    return problems


def _reasons(sv: Survey, served: bool, ws: Workspace) -> List[str]:
    reasons = []
    if not served:
        reasons.append(
            f"no series lists megatron-core {sv.onto_version}; {sv.series.name} surveyed: rebase "
            f"with `mla-seam rebase --megatron DIR --onto {sv.onto} --from {sv.series.line}`"
        )
    for p in sv.patches:
        if served and p.cls not in (PatchClass.EXACT, PatchClass.OFFSET):
            reasons.append(f"{p.hook} {p.name}: {p.cls.value}: {p.detail}")
        elif not served and p.cls in (PatchClass.CONFLICT, PatchClass.THREE_WAY):
            reasons.append(f"{p.hook} {p.name}: {p.cls.value}: {p.detail}")
    if served:
        reasons += _preimage_problems(ws, sv.series, sv.onto_version, sv.onto_commit)
    reasons += contracts.adapter_problems(sv.new_contracts)
    return reasons


def tag_entry(
    ws: Workspace,
    lines: Sequence[Series],
    ref: str,
    previous: Optional[Dict[str, object]],
    baseline: Optional[Series] = None,
) -> Dict[str, object]:
    """The drift schema's ``tags[]`` entry of one ref (``baseline``: also survey that line)."""
    commit, source = ws.resolve(ref)
    version = version_at(ws.repo, commit)
    s, served = series_for(lines, version)
    sv = survey(ws, s, ref, range_diff=False)
    changes: List[Dict[str, object]] = []
    if previous is not None:
        prev_values = previous["contracts"]
        changes = [
            dict(c.to_json(), since=previous["tag"])
            for c in contracts.diff(prev_values, sv.new_contracts)  # type: ignore[arg-type]
        ]
    reasons = _reasons(sv, served, ws)
    base = None
    if baseline is not None:
        bv = sv if baseline.name == s.name else survey(ws, baseline, ref, range_diff=False)
        base = {"series": baseline.name, "patches": [p.to_json() for p in bv.patches]}
    return {
        "tag": ref,
        "version": version,
        "line": releases.line_of(version),
        "commit": commit,
        "source": source,
        "series": s.name,
        "served": served,
        "history": sv.history,
        "patches": [p.to_json() for p in sv.patches],
        "contracts": sv.new_contracts,
        "contract_changes": changes,
        "verdict": SUPPORTED if not reasons else NEEDS_WORK,
        "reasons": reasons,
        "baseline": base,
        "gpu": None,
    }


# --- the sweep ---------------------------------------------------------------------------------


def _progress(total: int):
    """A rich progress bar on an interactive stderr, else ``None`` (a log line per tag)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console  # pylint: disable=import-outside-toplevel
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("drift {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def sweep(
    ws: Workspace,
    refs: Sequence[str],
    lines: Sequence[Series],
    baseline: Optional[Series] = None,
) -> List[Dict[str, object]]:
    """``tag_entry`` for every ref, in order, each compared with the one before."""
    entries: List[Dict[str, object]] = []
    bar = _progress(len(refs))
    task = bar.add_task("", total=len(refs)) if bar else None
    with bar or contextlib.nullcontext():
        for ref in refs:
            if bar:
                bar.update(task, description=ref)
            else:
                log.info("mla-seam drift: %s", ref)
            previous = entries[-1] if entries else None
            entries.append(tag_entry(ws, lines, ref, previous, baseline))
            if bar:
                bar.advance(task)
    return entries


def _line_summary(entries: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """Per release line: its tags, which hooks moved, became upstream/obsolete, contract drift."""
    lines: Dict[str, Dict[str, object]] = {}
    for entry in entries:
        line = str(entry["line"])
        row = lines.setdefault(
            line,
            {
                "series": entry["series"],
                "tags": [],
                "verdict": SUPPORTED,
                **{cls.value: [] for cls in PatchClass},
                "contracts_changed": [],
            },
        )
        row["tags"].append(entry["tag"])  # type: ignore[union-attr]
        if entry["verdict"] != SUPPORTED:
            row["verdict"] = NEEDS_WORK
        patches = (entry["baseline"] or entry)["patches"]  # type: ignore[index]
        if entry["baseline"]:
            ours = {p["hook"] for p in entry["patches"]}  # type: ignore[union-attr]
            theirs = {p["hook"] for p in patches}  # type: ignore[union-attr]
            row["line_only"] = sorted(set(row.get("line_only", [])) | (ours - theirs))
        for p in patches:  # type: ignore[union-attr]
            bucket = row[p["class"]]
            if p["hook"] not in bucket:
                bucket.append(p["hook"])
        for change in entry["contract_changes"]:  # type: ignore[union-attr]
            name = change["probe"] + (f"[{change['key']}]" if change["key"] else "")
            if name not in row["contracts_changed"]:
                row["contracts_changed"].append(name)
    return lines


def report(
    spec: str, entries: Sequence[Dict[str, object]], baseline: Optional[str] = None
) -> Dict[str, object]:
    """The whole ``drift.json`` document."""
    needs = [e["tag"] for e in entries if e["verdict"] != SUPPORTED]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": f"mla-seam {__version__}",
        "range": spec,
        "baseline": baseline,
        "classes": [c.value for c in PatchClass],
        "probes": [
            {
                "name": p.name,
                "file": p.file,
                "description": p.description,
                "checked": p.expect is not None,
                "relied_on_by": p.why,
            }
            for p in contracts.PROBES
        ],
        "tags": list(entries),
        "lines": _line_summary(entries),
        "summary": {
            "tags": len(entries),
            "supported": len(entries) - len(needs),
            "needs_work": len(needs),
            "needs_work_tags": needs,
            "verdict": SUPPORTED if not needs else NEEDS_WORK,
        },
    }


# --- rendering ---------------------------------------------------------------------------------


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


def markdown(doc: Dict[str, object]) -> str:
    """``drift.md``: the matrix, the per-line summary, contract changes and reasons."""
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
        "Patch classes: exact, offset (moved by N lines), 3-way (merged, review), CONFLICT, "
        "upstream (already in the tag), obsolete (its Obsolete-If holds), - (not in the series).",
        "",
        "| tag | series | " + " | ".join(hooks) + " | contract changes | verdict |",
        "|---|---|" + "---|" * len(hooks) + "---|---|",
    ]
    for e in entries:
        cells = [_cell(e, h)[1] for h in hooks]
        served = e["series"] if e["served"] else f"({e['series']})"
        out.append(
            f"| {e['tag']} | {served} | "
            + " | ".join(cells)
            + f" | {len(e['contract_changes'])} | {e['verdict']} |"  # type: ignore[arg-type]
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
    """``drift.html``: the matrix as a coloured table (no dependencies)."""
    entries: List[Dict[str, object]] = doc["tags"]  # type: ignore[assignment]
    hooks = _hooks(entries)
    rows = []
    for hook in hooks:
        cells = []
        for e in entries:
            cls, text = _cell(e, hook)
            cells.append(f'<td style="background:{_COLORS[cls]}">{html.escape(text)}</td>')
        rows.append(f"<tr><th>{hook}</th>{''.join(cells)}</tr>")
    changed = "".join(f"<td>{len(e['contract_changes'])}</td>" for e in entries)  # type: ignore[arg-type]
    verdict = "".join(
        f'<td style="background:{"#c8e6c9" if e["verdict"] == SUPPORTED else "#ffcdd2"}">'
        f"{e['verdict']}</td>"
        for e in entries
    )
    head = "".join(f"<th>{html.escape(str(e['tag']))}</th>" for e in entries)
    return (
        "<!doctype html><meta charset=utf-8><title>mla-seam drift</title>"
        f"<h1>mla-seam drift: {html.escape(str(doc['range']))}</h1>"
        '<table border=1 cellspacing=0 cellpadding=4 style="font-family:monospace">'
        f"<tr><th></th>{head}</tr>{''.join(rows)}"
        f"<tr><th>contracts changed</th>{changed}</tr><tr><th>verdict</th>{verdict}</tr>"
        "</table>\n"
    )


def plot(doc: Dict[str, object], path: Path) -> bool:
    """``drift.png``: hooks x tags coloured by class, contract changes and verdict rows.

    Returns:
        ``False`` when matplotlib is not installed (install the ``plot`` extra).
    """
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
        from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    entries: List[Dict[str, object]] = doc["tags"]  # type: ignore[assignment]
    panels = [(False, "serving series (verdict)")]
    if doc.get("baseline"):
        panels.append((True, f"{doc['baseline']} hooks on every tag"))
    heights = [len(_hooks(entries, b)) + (2 if not b else 0) for b, _ in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(2.0 + 0.95 * len(entries), 1.5 + 0.55 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (base, title) in zip(axes[:, 0], panels):
        _panel(ax, entries, base)
        ax.set_title(title, fontsize=10)
    legend = [Patch(color=c, label=k or "not in series") for k, c in _COLORS.items()]
    axes[0, 0].legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(f"mla-seam drift {doc['range']}: patch class per hook, contract changes")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def _panel(ax, entries: Sequence[Dict[str, object]], baseline: bool) -> None:
    hooks = _hooks(entries, baseline)
    labels = hooks + ([] if baseline else ["contracts changed", "verdict"])
    for x, e in enumerate(entries):
        for y, hook in enumerate(hooks):
            cls, text = _cell(e, hook, baseline)
            _box(ax, x, y, _COLORS[cls], text.replace("offset ", "").replace(",", "\n"))
        if baseline:
            continue
        count = len(e["contract_changes"])  # type: ignore[arg-type]
        _box(ax, x, len(hooks), "#ffe0b2" if count else "#f5f5f5", str(count))
        good = e["verdict"] == SUPPORTED
        _box(ax, x, len(hooks) + 1, "#c8e6c9" if good else "#ffcdd2", "ok" if good else "work")
    ax.set_xlim(0, len(entries))
    ax.set_ylim(len(labels), 0)
    ax.set_xticks([x + 0.5 for x in range(len(entries))])
    ax.set_xticklabels([str(e["tag"]).removeprefix("core_v") for e in entries], rotation=45)
    ax.set_yticks([y + 0.5 for y in range(len(labels))])
    ax.set_yticklabels(labels)


def _box(ax, x: int, y: int, color: str, text: str) -> None:
    from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel

    ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white"))
    ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7)


def write_outputs(doc: Dict[str, object], out: Path, with_plot: bool) -> List[Path]:
    """Write drift.json, drift.md, drift.html (and drift.png) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "drift.json", out / "drift.md", out / "drift.html"]
    written[0].write_bytes(json_bytes(doc))
    written[1].write_text(markdown(doc), encoding="utf-8")
    written[2].write_text(html_table(doc), encoding="utf-8")
    if with_plot:
        if plot(doc, out / "drift.png"):
            written.append(out / "drift.png")
        else:
            log.warning("mla-seam drift: matplotlib missing (pip install mla-seam[plot]): no PNG")
    return written


def validate(doc: Dict[str, object]) -> None:
    """Validate ``doc`` against ``schemas/drift.schema.json`` (needs ``jsonschema``)."""
    import jsonschema  # pylint: disable=import-outside-toplevel

    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


# --- the verb ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Sweep, write the outputs, print the matrix; exit 17 when any tag needs work."""
    tree = MegatronTree.resolve(Path(args.megatron))
    lines = load_lines(paths.patches_dir())
    baseline = series_by_name(args.baseline, paths.patches_dir()) if args.baseline else None
    with Workspace.create(tree.root if tree.repo is not None else None) as ws:
        refs = tags_in_range(ws, args.tags)
        entries = sweep(ws, refs, lines, baseline)
    doc = report(args.tags, entries, baseline.name if baseline else None)
    if args.out:
        for path in write_outputs(doc, Path(args.out), not args.no_plot):
            log.info("mla-seam drift: wrote %s", path)
    text = markdown(doc)
    _emit(text.split("\n## Per release line")[0].rstrip())
    needs = doc["summary"]["needs_work_tags"]  # type: ignore[index]
    if needs:
        raise DriftFoundError(
            f"{len(needs)} of {len(entries)} tags need work: {', '.join(needs)}",
            "see the reasons in drift.md (--out DIR); rebase with `mla-seam rebase`",
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``drift`` verb to the CLI."""
    parser = subparsers.add_parser(
        "drift",
        help="matrix of patch classes, contract probes and adapter verdicts over a tag range",
        description=(
            "For every tag in FROM..TO: survey the serving series, probe the upstream API the "
            "adapter relies on, and give a verdict. Writes drift.json/md/png/html with --out. "
            "Exit 17 when any tag needs work."
        ),
    )
    parser.add_argument(
        "--megatron", metavar="DIR", required=True, help="any Megatron-LM checkout or folder"
    )
    parser.add_argument(
        "--tags",
        metavar="FROM..TO",
        required=True,
        help="tags, versions or lines (0.13..0.19); TO may be a ref of DIR such as main",
    )
    parser.add_argument("--out", metavar="DIR", help="write drift.json, .md, .png, .html here")
    parser.add_argument(
        "--baseline",
        metavar="LINE",
        help="also survey this line's series on every tag (how its hooks drift), e.g. 0.16",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip drift.png")
    parser.set_defaults(func=run)


def load_report(path: Path) -> Dict[str, object]:
    """Read a ``drift.json`` (for the suite and CI jobs that add GPU results)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def tags_needing_work(doc: Dict[str, object]) -> Iterable[str]:
    """Tags whose verdict is not ``supported``."""
    return [e["tag"] for e in doc["tags"] if e["verdict"] != SUPPORTED]  # type: ignore[union-attr]
