"""The ``suite`` verb's command line: its options, and which run of the package they start.

``mla-seam suite`` registers through :func:`register`; ``python -m mla_seam.suite`` is
:func:`main`, the same verb without the CLI's other verbs (no GitPython needed to run phases).
Every GPU run of the project goes through here, the device recipe's included:

* one release's three trees in this process (``--release V`` or ``--megatron ...``:
  :func:`mla_seam.suite.runner.run_suite`);
* several releases and moving targets over a host's GPUs inside a deadline (``--release
  V:BASE`` repeated, ``--target ARCHIVE:BASE``, ``--dist V:N``, ``--deadline-s``, ``--gpus``:
  :func:`mla_seam.suite.lines.run_lines`, which the nightly's GPU phase calls too);
* the multi-GPU phase (``--nproc N``: :func:`mla_seam.suite.dist.run_multigpu`);
* stored runs' verdicts derived again (``--reattribute``: :func:`mla_seam.suite.runner.reattribute`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mla_seam.errors import SeamError, UsageError
from mla_seam.output import emit
from mla_seam.suite import device, dist, lines
from mla_seam.suite.phases import PHASE_NAMES
from mla_seam.suite.runner import default_out, reattribute, run_suite
from mla_seam.suite.trees import DEFAULT_BASE, choose_base, stage

log = logging.getLogger(__name__)


def _counts(verdict: Dict[str, Any]) -> str:
    return ", ".join(f"{n} {a}" for a, n in verdict["counts"].items() if n)


def run(args: argparse.Namespace) -> int:
    """The ``suite`` verb; exit 0 when the patched tree passed and the overlay broke nothing."""
    if args.index is not None:
        from mla_seam import results_index  # pylint: disable=import-outside-toplevel

        emit(str(results_index.write(Path(args.index) if args.index else default_out())))
        return 0
    if args.reattribute:
        for folder in args.reattribute:
            verdict = reattribute(folder, args.out)["verdict"]
            emit(f"{verdict['tag']}: {verdict['verdict']} ({_counts(verdict)})")
        return 0
    if args.nproc:
        if args.release or not args.megatron:
            raise UsageError(
                "--nproc runs on trees staged by hand: give --megatron (and --vanilla-megatron)",
                "e.g. mla-seam suite --nproc 2 --megatron PATCHED --vanilla-megatron VANILLA",
            )
        return _multigpu(args)
    releases = args.release or []
    several = len(releases) > 1 or any(":" in r or "=" in r for r in releases)
    if several or args.target or args.dist or args.deadline_s is not None or args.gpus:
        if args.megatron:
            raise UsageError(
                "--megatron runs one set of trees staged by hand; --target, --dist, --deadline-s "
                "and several --release stage their own",
                "drop --megatron, or run one release: mla-seam suite --megatron PATCHED ...",
            )
        return _lines(args)
    if bool(releases) == bool(args.megatron):
        raise UsageError(
            "give either --release (stage the trees) or --megatron (trees staged by hand)",
            "e.g. mla-seam suite --release 0.19, or --megatron PATCHED --vanilla-megatron VANILLA",
        )
    return _one(args, releases[0] if releases else None)


def _one(args: argparse.Namespace, release: Optional[str]) -> int:
    """One set of trees in this process."""
    megatron, vanilla, base = args.megatron, args.vanilla_megatron, args.base_megatron
    probed = None
    if release:
        probed = device.probe_device(args.python or sys.executable)
        device.require_gpu(probed)  # before staging three trees for nothing
        trees = stage(release, choose_base(release, args.base, args.base_from), _work(args))
        megatron, vanilla, base = trees["patched"], trees["vanilla"], trees.get("base")
    results, out_dir = run_suite(
        megatron=megatron,
        vanilla=vanilla,
        base=base,
        out=args.out,
        only=args.only.split(",") if args.only else None,
        update_goldens=args.update_goldens,
        python=args.python,
        pytest_args=args.pytest_arg or (),
        device=probed,
    )
    emit(f"{out_dir / 'results.md'}")
    for phase in results["phases"]:
        state = "skipped" if phase.get("skipped_reason") else ("ok" if phase["ok"] else "FAILED")
        emit(f"  {phase['name']:<18} {state:<7} {phase['counts']}")
    for role, golden in sorted(results["golden"].items()):
        emit(f"  golden {role:<11} {golden.get('status')}")
    verdict = results["verdict"]
    emit(f"  verdict            {verdict['verdict']} ({_counts(verdict)})")
    return 0 if results["ok"] and verdict["verdict"] != "overlay_broke" else 1


def _work(args: argparse.Namespace) -> Path:
    return Path(args.work or Path.cwd() / "mla-seam-trees")


def _lines(args: argparse.Namespace) -> int:
    """Several releases and moving targets over the host's GPUs (:mod:`mla_seam.suite.lines`)."""
    python = args.python or sys.executable
    probed = device.probe_device(python)
    device.require_gpu(probed)  # before staging trees for nothing
    gpus = _gpus(args.gpus, probed)
    out = Path(args.out) if args.out else Path.cwd() / "results"
    work = _work(args)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / lines.LOG_NAME, "a", encoding="utf-8") as log_file:

        def say(text: str) -> None:
            line = f"{time.strftime('%H:%M:%S')} {text}"
            emit(line)
            log_file.write(line + "\n")
            log_file.flush()

        say(f"GPUs {gpus}; deadline {args.deadline_s if args.deadline_s is not None else '-'}s")
        half = None if args.deadline_s is None else args.deadline_s / 2
        dist_jobs = [lines.dist_job(spec, out, work, python, half) for spec in args.dist or ()]
        planned: List[lines.Line] = []
        for spec in args.release or ():
            planned.append(lines.release_line(_with_defaults(args, spec), out, work))
        for spec in args.target or ():
            planned.append(lines.target_line(_with_defaults(args, spec, base=False), out, work))
        left = None if args.deadline_s is None else args.deadline_s - (time.monotonic() - start)
        say("staged")
        outcomes = lines.run_lines(
            planned, gpus, out / "logs", probed, deadline_s=left, extra_jobs=dist_jobs,
            python=python, say=say,
        )  # fmt: skip
        summary = lines.write_summary(outcomes, out)
        say("units done per release: " + json.dumps({k: len(v) for k, v in summary.items()}))
    for outcome in outcomes:
        verdict = outcome.verdict
        state = f"{verdict['verdict']} ({_counts(verdict)})" if verdict else "no verdict yet"
        emit(f"{outcome.folder / 'results.md'}: {state}")
    failed = [j for o in outcomes for j in o.jobs if j.outcome == "ran" and j.rc not in (0, 1)]
    return 1 if failed else 0


def _with_defaults(args: argparse.Namespace, spec: str, base: bool = True) -> str:
    """``spec`` with ``--base`` and ``--only`` filled in where it names neither."""
    head, has_units, units = spec.partition("=")
    if base and ":" not in head:
        chosen = choose_base(head, args.base, args.base_from)
        head = f"{head}:{chosen or 'none'}"
    if not has_units and args.only:
        units = args.only
    return f"{head}={units}" if units else head


def _gpus(text: Optional[str], probed: device.DeviceInfo) -> List[int]:
    if not text:
        return list(range(probed.device_count or 1))
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 0:
        raise UsageError(
            f"--gpus {text}: not a comma-separated list of device indices", "e.g. --gpus 0,1"
        )
    return gpus


def _multigpu(args: argparse.Namespace) -> int:
    """``--nproc N``: exit 0 when every patched case passed."""
    results = dist.run_multigpu(
        args.megatron,
        args.vanilla_megatron,
        args.out,
        args.nproc,
        [n for n in (args.cases or "").split(",") if n] or None,
        python=args.python,
        update_goldens=args.update_goldens,
        backend=args.dist_backend,
        time_budget_s=args.time_budget_s,
        fresh=args.fresh,
    )
    emit(f"{results['folder']}/results.md")
    for row in results["cases"]:
        p, v = row.get("patched") or {}, row.get("vanilla") or {}
        status = "ok" if p.get("ok") else ("skipped" if p.get("outcome") == "skipped" else "FAILED")
        emit(
            f"  {row['name']:<36} {status:<8} patched={p.get('outcome')} "
            f"vanilla={v.get('outcome', '-')}"
        )
    for layout, info in sorted(results["golden"].items()):
        emit(f"  golden {layout:<28} {info['status']}")
    return 0 if results["ok"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``suite`` verb to the CLI."""
    parser = subparsers.add_parser(
        "suite",
        help="run the GPU suite on vanilla, patched and base trees, with attribution",
        description=(
            "Run tests/gpu on the patched and vanilla trees of a release and the patched tree of "
            "the base release, one pytest process per phase and tree, attribute every finding "
            "(upstream changed / overlay broke / absorbed / unchanged) and write "
            "<out>/<tag>/<card>/{results.json,results.md,bench.json,verdict.json,golden_*}. "
            "Several releases or moving targets (--release V:BASE repeated, --target, --dist, "
            "--deadline-s) run over the host's GPUs, resumable. Needs a CUDA device (exit 18 "
            "without one)."
        ),
    )
    parser.add_argument(
        "--release",
        action="append",
        metavar="V[:BASE][=UNITS]",
        help="stage the three trees of this release; repeat it (or name a BASE, 'none': two "
        "trees, or UNITS) to run several over the host's GPUs",
    )
    parser.add_argument(
        "--base",
        metavar="V",
        help=f"base release for --release (default: --base-from's last good, else {DEFAULT_BASE};"
        " 'none': no base tree)",
    )
    parser.add_argument(
        "--base-from", metavar="DRIFT_JSON", help="pick the base: the last release marked good"
    )
    parser.add_argument(
        "--work", metavar="DIR", help="where --release stages trees (default ./mla-seam-trees)"
    )
    parser.add_argument("--megatron", metavar="DIR", help="the patched tree (staged by hand)")
    parser.add_argument(
        "--vanilla-megatron",
        "--baseline-megatron",
        dest="vanilla_megatron",
        metavar="DIR",
        help="the vanilla tree of the same release",
    )
    parser.add_argument(
        "--base-megatron", metavar="DIR", help="the patched tree of the base release"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="results folder (default: the repository's results/)"
    )
    parser.add_argument(
        "--only",
        metavar="PHASES",
        help=f"comma-separated phases ({','.join(PHASE_NAMES)}) or units (bench@vanilla)",
    )
    parser.add_argument(
        "--update-goldens",
        action="store_true",
        help="replace this tag's golden values with the observed ones instead of comparing",
    )
    parser.add_argument(
        "--python", metavar="EXE", help="interpreter for the tests (default: this one)"
    )
    parser.add_argument(
        "--pytest-arg",
        action="append",
        metavar="ARG",
        help="extra pytest argument for every phase (repeatable), e.g. --pytest-arg=-x",
    )
    parser.add_argument(
        "--reattribute",
        nargs="+",
        metavar="RUN",
        help="derive the verdict of stored runs (results/<tag>/<card>) again with this "
        "version's attribution; runs nothing, needs no GPU; with --out the new files go to "
        "<out>/<tag>/<card> and RUN is left as it was",
    )
    parser.add_argument(
        "--index",
        nargs="?",
        const="",
        metavar="DIR",
        help="write the index that opens DIR/README.md (default: the repository's results/): "
        "per tag and moving target, is it ok and since when, from every verdict.json and the "
        "drift report; runs nothing, needs no GPU",
    )
    fleet = parser.add_argument_group("several suites over a host's GPUs")
    fleet.add_argument(
        "--target",
        action="append",
        metavar="ARCHIVE:BASE[=UNITS]",
        help="a moving target (main, dev) from a git archive of its megatron/ folder "
        "(git archive -o dev.tar.gz origin/dev megatron); results under its name",
    )
    fleet.add_argument(
        "--dist", action="append", metavar="V:N", help="also the multi-GPU cases of V on N GPUs"
    )
    fleet.add_argument(
        "--deadline-s",
        type=float,
        metavar="S",
        help="start nothing that would end after S seconds; a later call with the same --out "
        "runs what is left",
    )
    fleet.add_argument("--gpus", metavar="LIST", help="device indices (default: all visible)")
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
    parser.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.suite ARGS``: the verb without the CLI's other verbs.

    ``mla-seam suite`` imports every verb (GitPython among their needs); this entry point needs
    only the standard library and the interpreter's torch, for GPU machines without GitPython.
    """
    parser = argparse.ArgumentParser(prog="python -m mla_seam.suite")
    sub = parser.add_subparsers(dest="verb")
    register(sub)
    args = parser.parse_args(["suite", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except SeamError as err:
        log.error("mla-seam suite: %s", err)
        return err.exit_code
