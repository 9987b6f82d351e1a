"""The ``drift`` verb: how every upstream tag in a range relates to the series, the adapter and,
with GPU results, to the behaviour the suite measured.

::

    mla-seam drift --megatron DIR --tags FROM..TO [--baseline LINE] [--pre] [--include V,V]
                   [--gpu-results DIR] [--history FILE] [--out DIR] [--no-plot]

For each tag in the range (:mod:`mla_seam.drift.sweep`: every known release between FROM and TO,
plus DIR's own ``core_vX.Y.Z`` tags there, pre-releases only with ``--pre``; TO may also be any
ref of DIR, such as ``main``) the sweep runs the survey (:mod:`mla_seam.survey`) of the series
that serves the tag (or, for a release no series lists, the line a rebase would start from),
reads the contract probes, and gives a verdict:

* ``supported``: a series lists the release, every patch applies strictly (exact or offset),
  the pre-images are the ones the manifest recorded, every probed contract has a value the
  adapter handles, and the GPU verdict (if any) is ``pass`` or ``incomplete``;
* ``needs_work``: anything else, with the reasons.

``--gpu-results`` attaches the three-tree suite's verdicts (:mod:`mla_seam.drift.gpu`);
``--history`` leads the report with what changed since the last run and appends this one
(:mod:`mla_seam.drift.history`). DIR may be any Megatron checkout or folder: tags it lacks are
materialized into the mla-seam cache and fetched into a scratch repository; DIR is never written.

Outputs (``--out``): ``drift.json`` (schema ``schemas/drift.schema.json``, ``schema_version``
:data:`SCHEMA_VERSION`), ``drift.md``, ``drift.html`` (no dependency) and, with matplotlib (the
``plot`` extra), ``drift.png``, ``drift-perf.png`` and ``drift-golden.png``
(:mod:`mla_seam.drift.plots`). Exit 17 (:class:`~mla_seam.errors.DriftFoundError`) when any tag
needs work, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from mla_seam import paths
from mla_seam.drift import gpu, history, plots
from mla_seam.drift.render import html_table, markdown
from mla_seam.drift.sweep import (
    NEEDS_WORK,
    SCHEMA_VERSION,
    SUPPORTED,
    known_releases,
    report,
    sweep,
    tag_entry,
    tags_in_range,
)
from mla_seam.errors import DriftFoundError, UsageError
from mla_seam.series import json_bytes, series_by_name
from mla_seam.survey import Workspace, load_lines
from mla_seam.tree import MegatronTree

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "drift.schema.json"

__all__ = [
    "NEEDS_WORK",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "SUPPORTED",
    "build",
    "html_table",
    "known_releases",
    "load_report",
    "markdown",
    "register",
    "report",
    "run",
    "sweep",
    "tag_entry",
    "tags_in_range",
    "tags_needing_work",
    "validate",
    "write_outputs",
]


def _emit(text: str) -> None:
    """The one place result lines are written to stdout."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def build(
    megatron: Path,
    tags: str,
    *,
    baseline: Optional[str] = None,
    include: Sequence[str] = (),
    include_pre: bool = False,
    gpu_results: Optional[Path] = None,
    history_file: Optional[Path] = None,
    pre_after: Optional[str] = None,
    also: Sequence[str] = (),
    sweep_cache: Optional[Path] = None,
) -> Dict[str, Any]:
    """Sweep ``tags`` on ``megatron`` and return the whole report (the verb without output).

    The history file is read (``since_previous``) but not appended to; see :func:`write_outputs`.
    ``pre_after`` keeps only pre-releases newer than that version (with ``include_pre``);
    ``also`` adds further refs of the checkout (branches) after the range; ``sweep_cache`` is
    a folder of per-tag entries (:mod:`mla_seam.drift.cache`) to reuse and fill.

    Raises:
        UsageError: A malformed or empty range.
        UpstreamError: A tag that is neither known nor in the checkout (exit 15).
    """
    tree = MegatronTree.resolve(Path(megatron))
    lines = load_lines(paths.patches_dir())
    base_series = (
        series_by_name(baseline, paths.patches_dir(), option="--baseline") if baseline else None
    )
    with Workspace.create(tree.root if tree.repo is not None else None) as ws:
        refs, skipped = tags_in_range(ws, tags, include, include_pre, pre_after, also)
        entries = sweep(ws, refs, lines, base_series, sweep_cache)
    doc = report(
        tags,
        entries,
        base_series.name if base_series else None,
        include_pre=include_pre,
        skipped_prereleases=skipped,
    )
    if gpu_results is not None:
        if not Path(gpu_results).is_dir():
            raise UsageError(
                f"--gpu-results {gpu_results} is not a folder",
                "pass the suite's results folder (<DIR>/<tag>/<card>/verdict.json)",
            )
        count = gpu.attach(doc, Path(gpu_results))
        log.info("mla-seam drift: GPU verdicts for %d of %d tags", count, len(entries))
    if history_file is not None:
        previous = history.load(history_file)
        doc["since_previous"] = history.since(doc, previous[-1] if previous else None)
    return doc


def write_outputs(
    doc: Dict[str, Any],
    out: Path,
    with_plot: bool,
    history_file: Optional[Path] = None,
    append: bool = True,
) -> List[Path]:
    """Write drift.json, .md, .html (and the figures) into ``out``; append to the history
    (unless ``append`` is false: the history is then read for the trend only)."""
    out.mkdir(parents=True, exist_ok=True)
    trend = None
    if history_file is not None:
        trend = history.trend(history.load(history_file), doc)
    written = [out / "drift.json", out / "drift.md", out / "drift.html"]
    written[0].write_bytes(json_bytes(doc))
    written[1].write_text(markdown(doc, trend), encoding="utf-8")
    written[2].write_text(html_table(doc), encoding="utf-8")
    if with_plot:
        figures = (
            ("drift.png", plots.matrix),
            ("drift-perf.png", plots.performance),
            ("drift-golden.png", plots.golden),
        )
        for name, draw in figures:
            if draw(doc, out / name):
                written.append(out / name)
            else:
                (out / name).unlink(missing_ok=True)
        if not any(p.suffix == ".png" for p in written):
            log.warning("mla-seam drift: matplotlib missing (pip install mla-seam[plot]): no PNG")
    if history_file is not None and append:
        history.append(history_file, doc)
        written.append(Path(history_file))
    return written


def validate(doc: Mapping[str, Any]) -> None:
    """Validate ``doc`` against ``schemas/drift.schema.json`` (needs ``jsonschema``).

    The schema refers to ``gpu_verdict.schema.json`` beside it (a tag's GPU findings); both are
    loaded from the package, never fetched.
    """
    # pylint: disable=import-outside-toplevel
    import jsonschema
    from referencing import Registry, Resource

    schemas = [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted(SCHEMA_PATH.parent.glob("*.json"))
    ]
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def run(args: argparse.Namespace) -> int:
    """Sweep, write the outputs, print the matrix; exit 17 when any tag needs work."""
    history_file = Path(args.history) if args.history else None
    doc = build(
        Path(args.megatron),
        args.tags,
        baseline=args.baseline,
        include=[v for v in (args.include or "").split(",") if v.strip()],
        include_pre=args.pre,
        gpu_results=Path(args.gpu_results) if args.gpu_results else None,
        history_file=history_file,
    )
    if args.out:
        for path in write_outputs(doc, Path(args.out), not args.no_plot, history_file):
            log.info("mla-seam drift: wrote %s", path)
    text = markdown(doc)
    _emit(text.split("\n## Per release line")[0].rstrip())
    needs = doc["summary"]["needs_work_tags"]
    if needs:
        raise DriftFoundError(
            f"{len(needs)} of {len(doc['tags'])} tags need work: {', '.join(needs)}",
            "see the reasons in drift.md (--out DIR); rebase with `mla-seam rebase`",
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``drift`` verb to the CLI."""
    parser = subparsers.add_parser(
        "drift",
        help="matrix of patch classes, contract probes, GPU and adapter verdicts over a tag range",
        description=(
            "For every tag in FROM..TO: survey the serving series, probe the upstream API the "
            "adapter relies on, attach the GPU suite's verdicts, and give a verdict. Writes "
            "drift.json/md/html/png with --out. Exit 17 when any tag needs work."
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
    parser.add_argument("--out", metavar="DIR", help="write drift.json, .md, .html, .png here")
    parser.add_argument(
        "--baseline",
        metavar="LINE",
        help="also survey this line's series on every tag (how its hooks drift), e.g. 0.16",
    )
    parser.add_argument(
        "--pre", action="store_true", help="sweep pre-releases (rc, dev) too; default: skip them"
    )
    parser.add_argument(
        "--include",
        metavar="V,V",
        help="further releases to sweep (versions the package index reported)",
    )
    parser.add_argument(
        "--gpu-results",
        metavar="DIR",
        help="attach the GPU suite's verdicts (<DIR>/<tag>/<card>/verdict.json)",
    )
    parser.add_argument(
        "--history",
        metavar="FILE",
        help="lead with what changed since the last run recorded there; append this run",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    parser.set_defaults(func=run)


def load_report(path: Path) -> Dict[str, Any]:
    """Read a ``drift.json`` (for the suite and CI jobs that add GPU results)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def tags_needing_work(doc: Mapping[str, Any]) -> Iterable[str]:
    """Tags whose verdict is not ``supported``."""
    return [e["tag"] for e in doc["tags"] if e["verdict"] != SUPPORTED]
