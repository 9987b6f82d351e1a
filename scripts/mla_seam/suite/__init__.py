"""The ``suite`` verb: the GPU suite (``tests/gpu``) on three trees, with upstream/overlay attribution.

::

    mla-seam suite --release 0.19 [--base VERSION | --base-from DRIFT_JSON] [--work DIR] [--out DIR]
                   [--only PHASES] [--update-goldens]
    mla-seam suite --megatron PATCHED [--vanilla-megatron VANILLA] [--base-megatron BASE] ...

One run measures up to three trees on one card (:mod:`mla_seam.suite.trees`): vanilla and
patched of the release, and patched of the base release (the last release the drift report
marked good). ``--release`` stages them from the mla-seam cache (PyPI sdists or a git URL) and
applies the series; the ``--*-megatron`` options take trees staged by hand.

Each phase (:data:`PHASES`, one row per pytest file and the roles it runs on) is one pytest
process inside one tree: smoke, the independent oracles, the single-GPU matrix, golden values,
benchmarks, and the measurement files of issue #8 (THD sequence-count sweep with rope fusion
off and on, HF parity, kernel and sync counts) where this checkout has them. Every measured
quantity is attributed (:mod:`mla_seam.suite.attribution`): upstream changed, overlay broke,
absorbed, unchanged. Results per release and card in ``<out>/<tag>/<card>/``: ``results.json``,
``results.md``, ``bench.json``, ``verdict.json`` (read by ``mla-seam drift --gpu-results``) and
the golden-values files (see ``results/README.md``).

``--only`` runs a subset (phase names, or units such as ``bench@vanilla``) and merges it into an
existing ``results.json`` of the same tag, card, software and trees: the lent device allows 10
minutes per command, so a release can take two commands. Without a visible CUDA device the verb
raises :class:`~mla_seam.errors.DeviceError` (exit 18) before running anything. Multi-GPU phases
are rows with ``nproc > 1`` (``mla_seam.suite_dist`` launches them through torchrun).

``python -m mla_seam.suite`` is the same verb for GPU machines without GitPython (running needs
only the standard library and the tests' own imports; ``--release`` staging needs GitPython).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from mla_seam.paths import ADAPTER_RELPATH
from mla_seam.suite import device
from mla_seam.suite.attribution import build_verdict
from mla_seam.suite.benchmarks import GOALS, THD_GOAL_FROM, summarize_bench, summarize_cases
from mla_seam.suite.device import DeviceInfo, card_slug, probe_device, require_gpu
from mla_seam.suite.goldens import (
    GOLDEN_METRICS,
    compare_golden_cross,
    compare_golden_exact,
    golden_document,
    golden_filename,
    read_golden,
    validate_golden,
    write_golden,
)
from mla_seam.suite.phases import (
    PHASE_NAMES,
    PHASES,
    Phase,
    PhaseResult,
    Unit,
    parse_junit,
    parse_junit_cases,
    read_records,
    run_phase,
)
from mla_seam.suite.render import render_markdown
from mla_seam.suite.runner import (
    SCHEMA_VERSION,
    build_results,
    default_out,
    reattribute,
    run_suite,
)
from mla_seam.suite.trees import (
    DEFAULT_BASE,
    ROLES,
    TreeInfo,
    base_from_report,
    choose_base,
    inspect_tree,
    stage,
)

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_RELPATH",
    "DEFAULT_BASE",
    "GOALS",
    "GOLDEN_METRICS",
    "PHASES",
    "PHASE_NAMES",
    "ROLES",
    "SCHEMA_VERSION",
    "THD_GOAL_FROM",
    "DeviceInfo",
    "Phase",
    "PhaseResult",
    "TreeInfo",
    "Unit",
    "base_from_report",
    "choose_base",
    "build_results",
    "build_verdict",
    "card_slug",
    "compare_golden_cross",
    "compare_golden_exact",
    "device",
    "golden_document",
    "golden_filename",
    "inspect_tree",
    "parse_junit",
    "parse_junit_cases",
    "probe_device",
    "read_golden",
    "read_records",
    "register",
    "render_markdown",
    "require_gpu",
    "run",
    "run_phase",
    "run_suite",
    "stage",
    "summarize_bench",
    "summarize_cases",
    "validate_golden",
    "write_golden",
]


def run(args: argparse.Namespace) -> int:
    """The ``suite`` verb; exit 0 when the patched tree passed and the overlay broke nothing."""
    from mla_seam.errors import UsageError  # pylint: disable=import-outside-toplevel

    if getattr(args, "index", None) is not None:
        from mla_seam import results_index  # pylint: disable=import-outside-toplevel

        readme = results_index.write(Path(args.index) if args.index else default_out())
        sys.stdout.write(f"{readme}\n")
        return 0
    if getattr(args, "reattribute", None):
        for folder in args.reattribute:
            verdict = reattribute(folder, args.out)["verdict"]
            counts = ", ".join(f"{n} {a}" for a, n in verdict["counts"].items() if n)
            sys.stdout.write(f"{verdict['tag']}: {verdict['verdict']} ({counts})\n")
        return 0
    if getattr(args, "nproc", None):
        # The multi-GPU phase (torchrun + NCCL); it imports this package, hence the late import.
        from mla_seam import suite_dist  # pylint: disable=import-outside-toplevel

        if args.release or not args.megatron:
            raise UsageError(
                "--nproc runs on trees staged by hand: give --megatron (and --vanilla-megatron)",
                "e.g. mla-seam suite --nproc 2 --megatron PATCHED --vanilla-megatron VANILLA",
            )
        args.baseline_megatron = args.vanilla_megatron
        return suite_dist.run_from_args(args)
    if bool(args.release) == bool(args.megatron):
        raise UsageError(
            "give either --release (stage the trees) or --megatron (trees staged by hand)",
            "e.g. mla-seam suite --release 0.19, or --megatron PATCHED --vanilla-megatron VANILLA",
        )
    vanilla, base = args.vanilla_megatron, args.base_megatron
    megatron = args.megatron
    probed = None
    if args.release:
        probed = device.probe_device(args.python or sys.executable)
        require_gpu(probed)  # before staging three trees for nothing
        work = Path(args.work or Path.cwd() / "mla-seam-trees")
        trees = stage(args.release, choose_base(args.release, args.base, args.base_from), work)
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
    sys.stdout.write(f"{out_dir / 'results.md'}\n")
    for phase in results["phases"]:
        state = "skipped" if phase.get("skipped_reason") else ("ok" if phase["ok"] else "FAILED")
        sys.stdout.write(f"  {phase['name']:<18} {state:<7} {phase['counts']}\n")
    for role, golden in sorted(results["golden"].items()):
        sys.stdout.write(f"  golden {role:<11} {golden.get('status')}\n")
    verdict = results["verdict"]
    counts = ", ".join(f"{n} {a}" for a, n in verdict["counts"].items() if n)
    sys.stdout.write(f"  verdict            {verdict['verdict']} ({counts})\n")
    return 0 if results["ok"] and verdict["verdict"] != "overlay_broke" else 1


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
            "Needs a CUDA device (exit 18 without one)."
        ),
    )
    parser.add_argument("--release", metavar="V", help="stage the three trees of this release")
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
    _add_multigpu_arguments(parser)
    parser.set_defaults(func=run)


def _add_multigpu_arguments(parser: argparse.ArgumentParser) -> None:
    from mla_seam import suite_dist  # pylint: disable=import-outside-toplevel

    suite_dist.add_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.suite ARGS``: the verb without the CLI's other verbs.

    ``mla-seam suite`` imports every verb (GitPython among their needs); this entry point needs
    only the standard library and the interpreter's torch, for GPU machines without GitPython.
    """
    from mla_seam.errors import SeamError  # pylint: disable=import-outside-toplevel

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
