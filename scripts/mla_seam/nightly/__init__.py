"""The nightly drift job: upstream moves, the series follows, a pull request waits in the morning.

::

    python -m mla_seam.nightly --out DIR --phase cpu [--megatron CLONE --remote origin]
        [--follow main,dev] [--pre] [--results DIR] [--state DIR | --state-branch]
        [--no-discover]
    python -m mla_seam.nightly --out DIR --phase publish [--github OWNER/NAME] [--push-state]
    python -m mla_seam.nightly --out DIR --phase gpu [--gpu auto|on|off|dry-run]
    python -m mla_seam.nightly --out DIR --phase report [--github OWNER/NAME] [--push-state]

The same job runs in GitHub Actions (``ci/nightly.yml``, one job per phase, each with only the
permissions it needs) and on a workstation (``ci/nightly.sh``, phase ``all``). Phases:

1. **cpu** (:mod:`~mla_seam.nightly.cpu`): new releases on the package index, new tags and the
   followed branches from the clone's remote (blobless, treeless and shallow clones work), the
   drift sweep with the history of earlier nights (main and dev are rows beside the tags,
   with their own GPU verdicts), then per moving target (a new release tag, each followed
   branch, a served release that broke) a proposal (``rebase --write --accept-three-way`` into
   a bundle copy, :mod:`~mla_seam.nightly.propose`: ``patches/core_vX.Y/`` for a release,
   ``patches/main/`` and ``patches/dev/`` for those branches, nothing when the rebase writes
   what is checked in) or a tracking-issue text naming the hunks, the culprits and the command
   that finishes the port, and the targets the GPU job has to test (those whose hooked or
   probed files, series or adapter changed since their last GPU run);
2. **publish** (:mod:`~mla_seam.nightly.publish`): proposal branches pushed (never forced) and
   their pull requests opened or updated, tracking issues opened, updated with a comment or
   closed: only what changed;
3. **gpu** (:mod:`~mla_seam.nightly.gpu`): the proposed series staged on each target and the
   three-tree suite run with attribution (``--gpu dry-run``: staged and checked only);
4. **report**: the GPU verdicts as comments on the pull requests and tracking issues.

What the job remembers between nights is a folder of three files (:mod:`~mla_seam.nightly.state`)
kept on the data branch ``mla-seam/nightly-state``. Every call to GitHub goes through
:mod:`~mla_seam.nightly.github` (``gh api``; recorded in ``<out>/github-calls.jsonl``).

Exit status (:data:`EXIT_CODES`): 0 nothing to do; 17 upstream drift found; 25 the overlay
broke; 26 the job broke (index, remote or GitHub unreachable, a step crashed), with the cause,
never reported as drift.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mla_seam import releases
from mla_seam.nightly import cpu, gpu, publish, state
from mla_seam.nightly.cpu import (
    BASELINE_LINE,
    FIRST_LINE,
    MAIN_BRANCH,
    discover,
    discovery_command,
    parse_discovery,
)
from mla_seam.nightly.github import GitHub
from mla_seam.nightly.job import (
    EXIT_CODES,
    EXIT_DRIFT,
    EXIT_JOB_BROKE,
    EXIT_OK,
    EXIT_OVERLAY_BROKE,
    Job,
    JobBroke,
    summary,
    write_outcome,
)
from mla_seam.nightly.targets import Target, moving_targets, plan

log = logging.getLogger(__name__)

PHASES = ("cpu", "publish", "gpu", "report", "all")

__all__ = [
    "BASELINE_LINE",
    "EXIT_CODES",
    "EXIT_DRIFT",
    "EXIT_JOB_BROKE",
    "EXIT_OK",
    "EXIT_OVERLAY_BROKE",
    "FIRST_LINE",
    "MAIN_BRANCH",
    "PHASES",
    "Job",
    "JobBroke",
    "Target",
    "discover",
    "discovery_command",
    "main",
    "moving_targets",
    "parse_discovery",
    "plan",
    "run_job",
    "summary",
]


def _github(args: argparse.Namespace, out: Path) -> GitHub:
    repo = args.github or os.environ.get("GITHUB_REPOSITORY") or "local/dry-run"
    dry = args.github_dry_run or not (args.github or os.environ.get("GITHUB_REPOSITORY"))
    return GitHub(repo, dry_run=dry, log_path=out / "github-calls.jsonl")


def _state_dir(job: Job, args: argparse.Namespace) -> Path:
    """The phase's state folder, ``<out>/state``, filled from ``--state`` or the data branch."""
    folder = job.out / "state"
    if args.state_branch:
        project = publish._project(args)  # pylint: disable=protected-access
        found = state.read_branch(project, args.project_remote, folder)
        job.notes.append(
            f"state from {args.project_remote}/{state.BRANCH}"
            if found
            else f"no {state.BRANCH} branch on {args.project_remote} yet: an empty state"
        )
    else:
        state.copy(Path(args.state) if args.state else None, folder)
    return folder


def run_job(args: argparse.Namespace) -> Job:
    """Run ``args.phase``; the job's record (never raises for a broken step)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = [args.phase]
    if args.phase == "all":
        phases = ["cpu", "publish", "gpu", "report"] if args.publish else ["cpu", "gpu"]
    job = Job(out, phase=args.phase)
    try:
        folder = _state_dir(job, args)
        gh = _github(args, out)
        for phase in phases:
            if phase == "cpu":
                cpu.run(job, args, folder)
            elif phase == "publish":
                publish.run_publish(job, args, folder, gh)
            elif phase == "gpu":
                gpu.run(job, args)
            elif phase == "report":
                publish.run_report(job, args, folder, gh)
        if args.state and Path(args.state).resolve() != folder.resolve():
            state.copy(folder, Path(args.state))
    except JobBroke:
        pass
    write_outcome(job)
    return job


def build_parser() -> argparse.ArgumentParser:
    """The job's options (``python -m mla_seam.nightly --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m mla_seam.nightly",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--out", required=True, metavar="DIR", help="everything goes here")
    add("--phase", choices=PHASES, default="all", help="which part of the job (default: all)")
    add("--megatron", metavar="CLONE", help="a Megatron-LM clone (else the PyPI sdists)")
    add("--remote", metavar="NAME", help="fetch tags and the followed branches from this remote")
    add("--follow", default=",".join(releases.MOVING_TARGETS), metavar="B,B",
        help="upstream branches to follow (default: the moving targets, %(default)s)")  # fmt: skip
    add("--pre", action="store_true", help="also the upcoming pre-releases (rc, dev)")
    add("--since", default=FIRST_LINE, metavar="LINE", help=f"first line swept ({FIRST_LINE})")
    add("--no-discover", action="store_true", help="skip the package index (built-in list)")
    add("--no-plot", action="store_true", help="no PNG figures in the drift report")
    add("--no-sweep-cache", action="store_true",
        help="survey every tag again (default: reuse the entries of unchanged tags)")  # fmt: skip
    add("--results", metavar="DIR",
        help="GPU results for the drift report (default: results/ of --project, if there)")  # fmt: skip
    add("--state", metavar="DIR", help="the state folder to start from (and keep it there)")
    add("--state-branch", action="store_true",
        help=f"start from {state.BRANCH} of --project-remote instead")  # fmt: skip
    add("--push-state", action="store_true", help=f"commit the state to {state.BRANCH}")
    add("--gpu", choices=("auto", "on", "off", "dry-run"), default="auto",
        help="GPU phase: auto (when CUDA is visible), on, off, dry-run (stage and check only)")  # fmt: skip
    add("--targets", metavar="T,T", help="GPU phase: these targets (default: the changed ones)")
    add("--publish", action="store_true", help="phase all: also publish and report")
    add("--project", default=".", metavar="DIR", help="this repository's checkout (publish)")
    add("--project-remote", default="origin", metavar="NAME", help="its remote (origin)")
    add("--base-branch", default=os.environ.get("MLA_SEAM_BASE_BRANCH", "main"),
        metavar="BRANCH", help="the branch proposals are made against (main)")  # fmt: skip
    add("--github", metavar="OWNER/NAME", help="the repository (default $GITHUB_REPOSITORY)")
    add("--github-dry-run", action="store_true", help="record GitHub calls, send none")
    add("--token-kind", default=os.environ.get("MLA_SEAM_TOKEN_KIND", "app"),
        choices=("app", "pat", "github-token"), help="which token GH_TOKEN is")  # fmt: skip
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.nightly``; the exit status of :data:`EXIT_CODES`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    job = run_job(args)
    sys.stdout.write(summary(job))
    return job.exit_code
