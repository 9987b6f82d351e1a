"""The nightly drift job: discover, sweep, propose, test on GPUs, report (``ci/nightly.sh``).

::

    python -m mla_seam.nightly --out DIR [--megatron CLONE] [--remote origin] [--pre]
        [--no-discover] [--history FILE] [--gpu auto|on|off] [--phase all|cpu|gpu]
        [--targets TAG,TAG] [--results DIR] [--base-from DRIFT_JSON]

The same job runs in GitHub Actions (``ci/nightly.yml``) and on a workstation
(``ci/nightly.sh``). Steps, each recorded in ``<out>/outcome.json`` and ``<out>/summary.md``:

1. **discover**: new megatron-core releases from the package index
   (``mla-seam upstream list --refresh --json``; pre-releases only with ``--pre``);
2. **remote**: new tags and ``main`` from the clone's git remote (fetched into the clone; main
   lands on branch ``upstream-main``); without ``--megatron`` a checkout of every known release
   is materialized from the sdists;
3. **drift**: the sweep (``mla-seam drift`` with ``--baseline 0.16`` and the history file);
4. **propose**: a new release no series lists whose patches all classify exact or offset gets
   ``mla-seam rebase --write`` in a copy of the bundle: the new line folder and a pull-request
   description (the drift report) under ``<out>/proposals/<line>/``; three_way or conflict
   instead goes into the tracking issue (``<out>/tracking-issue.md``) with the culprit commits;
5. **gpu**: the three-tree suite (``mla-seam suite``, one process per visible GPU at a time) for
   each new or changed release, when a CUDA device is visible (else skipped, said so); the
   verdicts are attached to the report.

Exit status (:data:`EXIT_CODES`): 0 nothing to do; 17 upstream drift found (a tag needs work:
rebase, new behaviour); 25 the overlay broke (a release the series claims fails its patches or
contracts, or a GPU verdict says ``overlay_broke``); 26 the job broke (package index or git
remote unreachable, a step crashed), with the cause, never reported as drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mla_seam import drift, paths, releases, upstream
from mla_seam.drift import gpu as drift_gpu
from mla_seam.errors import (
    NIGHTLY_JOB_BROKE_EXIT,
    NIGHTLY_OVERLAY_BROKE_EXIT,
    DriftFoundError,
    SeamError,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DRIFT = 0, DriftFoundError.exit_code
EXIT_OVERLAY_BROKE, EXIT_JOB_BROKE = NIGHTLY_OVERLAY_BROKE_EXIT, NIGHTLY_JOB_BROKE_EXIT
EXIT_CODES = {
    EXIT_OK: "nothing to do",
    EXIT_DRIFT: "upstream drift found",
    EXIT_OVERLAY_BROKE: "the overlay broke",
    EXIT_JOB_BROKE: "the job broke",
}
BASELINE_LINE = "0.16"
FIRST_LINE = "0.13"
MAIN_BRANCH = "upstream-main"
#: Patch classes a new release may have for its series to be proposed without a human.
AUTOMATIC = ("exact", "offset")
NEEDS_HUMAN = ("three_way", "conflict")


class JobBroke(Exception):
    """A step of the job failed for a reason that is not drift (network, a crash)."""


@dataclasses.dataclass
class Step:
    """One step's record for the summary."""

    name: str
    status: str = "pending"  # ok | skipped | failed
    seconds: float = 0.0
    note: str = ""


@dataclasses.dataclass
class Job:
    """Everything the job learned; written as outcome.json and summary.md."""

    out: Path
    steps: List[Step] = dataclasses.field(default_factory=list)
    discovered: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    new_tags: List[str] = dataclasses.field(default_factory=list)
    gpu_targets: List[str] = dataclasses.field(default_factory=list)
    gpu_verdicts: Dict[str, str] = dataclasses.field(default_factory=dict)
    proposals: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    tracking: List[str] = dataclasses.field(default_factory=list)
    overlay_broke: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    report: Optional[Dict[str, Any]] = None
    broke: Optional[str] = None

    def step(self, name: str, body: Callable[[Step], None]) -> None:
        """Run one step; a :class:`JobBroke` or any crash marks the job broken and stops it."""
        step = Step(name)
        self.steps.append(step)
        start = time.monotonic()
        try:
            body(step)
            if step.status == "pending":
                step.status = "ok"
        except JobBroke as exc:
            step.status, step.note = "failed", str(exc)
            self.broke = f"{name}: {exc}"
        except Exception as exc:  # pylint: disable=broad-except
            step.status = "failed"
            step.note = f"{type(exc).__name__}: {exc}"
            self.broke = f"{name} crashed: {step.note}"
            log.error("nightly: %s crashed\n%s", name, traceback.format_exc())
        finally:
            step.seconds = round(time.monotonic() - start, 1)
        if self.broke:
            raise JobBroke(self.broke)

    @property
    def exit_code(self) -> int:
        """26 job broke > 25 overlay broke > 17 drift > 0."""
        if self.broke:
            return EXIT_JOB_BROKE
        if self.overlay_broke:
            return EXIT_OVERLAY_BROKE
        if self.report and self.report["summary"]["needs_work"]:
            return EXIT_DRIFT
        return EXIT_OK


# --- 1. discover --------------------------------------------------------------------------------


def discovery_command(include_pre: bool) -> List[str]:
    """The one call of release discovery (``mla-seam upstream list --refresh --json``)."""
    cmd = [sys.executable, "-m", "mla_seam", "upstream", "list", "--refresh", "--json"]
    return cmd + (["--pre"] if include_pre else [])


def parse_discovery(text: str) -> List[Dict[str, Any]]:
    """The releases of ``upstream list --json``: ``[{version, tag, line, prerelease, source,
    cached}, ...]``.

    Raises:
        JobBroke: not that JSON (another mla-seam, a truncated answer).
    """
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobBroke(f"release discovery printed no JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(rows, list):
        raise JobBroke(f"release discovery printed {type(rows).__name__}, not a list")
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("version"), str):
            raise JobBroke(f"release discovery row without a version: {row!r}")
        row.setdefault("prerelease", releases.is_prerelease(row["version"]))
        row.setdefault("source", "index")
    return rows


def discover(include_pre: bool, run: Callable[..., subprocess.CompletedProcess]) -> List[Dict]:
    """Ask the package index for releases; an unreachable index breaks the job (never drift)."""
    proc = run(discovery_command(include_pre), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        what = "the package index is unreachable" if proc.returncode == 15 else "discovery failed"
        raise JobBroke(f"{what} (mla-seam upstream list exit {proc.returncode}): {tail}")
    rows = parse_discovery(proc.stdout)
    return [r for r in rows if include_pre or not r["prerelease"]]


# --- 2. the git remote --------------------------------------------------------------------------


def fetch_remote(megatron: Path, remote: str) -> str:
    """Fetch tags and ``main`` of ``remote`` into the clone; return the ref main landed on."""
    import git  # pylint: disable=import-outside-toplevel
    from mla_seam import gitlayer  # pylint: disable=import-outside-toplevel

    repo = gitlayer.open_repo(megatron)
    if repo is None:
        raise JobBroke(f"--megatron {megatron} is not a git clone (the remote step needs one)")
    try:
        repo.git.fetch("--quiet", "--tags", "--force", remote)
        repo.git.fetch("--quiet", remote, f"+refs/heads/main:refs/heads/{MAIN_BRANCH}")
    except git.GitCommandError as exc:
        reason = (exc.stderr or str(exc)).strip().splitlines()[-1:] or ["git fetch failed"]
        raise JobBroke(f"git remote {remote!r} of {megatron} unreachable: {reason[0]}") from None
    return MAIN_BRANCH


def materialize_all(dest: Path, versions: Sequence[str]) -> Path:
    """One checkout holding every release (from the mla-seam cache / the sdists)."""
    try:
        return upstream.get_many(list(versions), dest)
    except SeamError as exc:
        raise JobBroke(f"could not materialize the releases: {exc.message}") from None


# --- 4. proposals and the tracking issue ----------------------------------------------------------


def classes(entry: Mapping[str, Any]) -> List[str]:
    """The patch classes of a tag's surveyed series."""
    return [p["class"] for p in entry["patches"]]


def plan(report: Mapping[str, Any], new_tags: Sequence[str]) -> Dict[str, List[Mapping[str, Any]]]:
    """Which tags needing work get an automatic rebase, which need a human, which broke us.

    * ``propose``: a new tag no series lists, every patch exact or offset;
    * ``human``: a tag needing work otherwise (three_way, conflict, contract, GPU);
    * ``overlay``: a tag the series already serves whose patches, pre-images or contracts fail
      (the bundle no longer does what it claims: the overlay broke, not upstream), or whose GPU
      verdict is ``overlay_broke``.
    """
    out: Dict[str, List[Mapping[str, Any]]] = {"propose": [], "human": [], "overlay": []}
    for entry in report["tags"]:
        if entry["verdict"] == drift.SUPPORTED:
            continue
        gpu = entry.get("gpu") or {}
        surveyed = set(classes(entry))
        ours = [r for r in entry["reasons"] if not str(r).startswith("GPU (")]
        if entry["served"] and ours:
            out["overlay"].append(entry)
        elif gpu.get("verdict") == "overlay_broke":
            out["overlay"].append(entry)
        elif (
            not entry["served"]
            and entry["tag"] in new_tags
            and str(entry["tag"]).startswith(releases.TAG_PREFIX)
            and surveyed <= set(AUTOMATIC)
            and not gpu
        ):
            out["propose"].append(entry)
        else:
            out["human"].append(entry)
    return out


def propose(entry: Mapping[str, Any], megatron: Path, out: Path, description: str) -> Dict:
    """``mla-seam rebase --write`` for one new tag, in a copy of the bundle; return what it made."""
    bundle = out / "proposals" / ".bundle"
    if not bundle.exists():
        for name in ("patches", "overlay"):
            shutil.copytree(paths.bundle_root() / name, bundle / name, symlinks=True)
    line = releases.line_of(str(entry["version"]))
    cmd = [sys.executable, "-m", "mla_seam", "rebase", "--megatron", str(megatron), "--onto",
           str(entry["tag"]), "--from", str(entry["series"]), "--write"]  # fmt: skip
    env = dict(os.environ, MLA_SEAM_ROOT=str(bundle))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    target = out / "proposals" / releases.line_dir_name(line)
    record = {
        "tag": str(entry["tag"]),
        "line": line,
        "folder": str(target),
        "exit": proc.returncode,
    }
    if proc.returncode != 0:
        record["error"] = (proc.stderr or proc.stdout).strip()[-500:]
        return record
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle / "patches" / releases.line_dir_name(line), target)
    (target / "PR.md").write_text(
        f"# mla-seam: serve {entry['tag']} with the {releases.line_dir_name(line)} series\n\n"
        f"Every hook of {entry['series']} applies to {entry['tag']} strictly (exact or offset), "
        "so the nightly job exported the series with `mla-seam rebase --write`:\n\n"
        f"```\n{proc.stdout.strip()}\n```\n\n---\n\n{description}",
        encoding="utf-8",
    )
    return record


def tracking_issue(report: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], md: str) -> str:
    """The tracking issue's body: the tags that need a human, their culprit commits, drift.md."""
    out = ["# mla-seam: upstream drift needs work", ""]
    for entry in entries:
        out.append(f"## {entry['tag']} ({', '.join(sorted(set(classes(entry))))})")
        out.append("")
        out += [f"- {r}" for r in entry["reasons"][:10]]
        for patch in entry["patches"]:
            for hunk in patch.get("hunks") or []:
                who = (
                    ", ".join(f"`{c['commit'][:12]}` {c['subject']}" for c in hunk["culprits"])
                    or "no commit found"
                )
                out.append(f"- {patch['hook']} `{hunk['file']}` {hunk['hunk']}: culprits {who}")
        out.append("")
    out += ["---", "", md]
    return "\n".join(out)


# --- 5. GPU ---------------------------------------------------------------------------------------


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


def gpu_count() -> int:
    """CUDA devices this job spreads the suite over (0: none visible)."""
    return _probe().device_count


def gpu_targets(report: Mapping[str, Any], new_or_changed: Sequence[str]) -> List[str]:
    """The newest release of each line among the new or changed tags, plus main if it changed."""
    newest: Dict[str, Mapping[str, Any]] = {}
    extra = []
    for entry in report["tags"]:
        tag = str(entry["tag"])
        if tag not in new_or_changed:
            continue
        if not tag.startswith(releases.TAG_PREFIX):
            extra.append(tag)
            continue
        line = str(entry["line"])
        if line not in newest or releases.version_key(entry["version"]) > releases.version_key(
            newest[line]["version"]
        ):
            newest[line] = entry
    return [str(e["tag"]) for e in newest.values()] + extra


def run_gpu(
    targets: Sequence[str],
    results: Path,
    work: Path,
    base_from: Optional[Path],
    devices: Sequence[int] = (0,),
) -> Dict[str, str]:
    """The three-tree suite of each release target, spread over ``devices``.

    Trees are staged one after the other first (releases share the base tree), then one
    ``mla-seam suite`` process per target runs on each free device (:mod:`mla_seam.suite.fleet`).

    Returns:
        ``{tag: verdict or why there is none}``.
    """
    from mla_seam.suite import fleet, trees  # pylint: disable=import-outside-toplevel

    verdicts: Dict[str, str] = {}
    jobs = []
    for tag in targets:
        if not tag.startswith(releases.TAG_PREFIX):
            verdicts[tag] = "skipped: the suite stages releases; stage a branch by hand"
            continue
        try:
            base = trees.choose_base(
                tag, base_from=base_from if base_from and base_from.is_file() else None
            )
            staged = trees.stage(tag, base, work)
        except SeamError as err:
            verdicts[tag] = f"no verdict (staging failed: {err})"
            continue
        argv = [sys.executable, "-m", "mla_seam", "suite", "--out", str(results)]
        for role, flag in (("patched", "--megatron"), ("vanilla", "--vanilla-megatron"),
                           ("base", "--base-megatron")):  # fmt: skip
            if role in staged:
                argv += [flag, str(staged[role])]
        jobs.append(fleet.Job(tag, argv))
    for job in fleet.run_jobs(jobs, devices, work / "logs"):
        found = sorted(
            results.glob(f"{releases.tag_of(releases.version_of_tag(job.name))}/*/verdict.json")
        )
        if found:
            verdicts[job.name] = json.loads(found[-1].read_text(encoding="utf-8"))["verdict"]
        else:
            verdicts[job.name] = f"no verdict (suite exit {job.rc}): {job.tail(2)}"
    return verdicts


# --- outputs ---------------------------------------------------------------------------------------


def write_outcome(job: Job) -> None:
    """``outcome.json``, ``summary.md`` (the job summary) and, in Actions, the step outputs."""
    code = job.exit_code
    outcome = {
        "exit_code": code,
        "outcome": EXIT_CODES[code],
        "broke": job.broke,
        "steps": [dataclasses.asdict(s) for s in job.steps],
        "discovered": job.discovered,
        "new_tags": job.new_tags,
        "gpu_targets": job.gpu_targets,
        "gpu_verdicts": job.gpu_verdicts,
        "proposals": job.proposals,
        "tracking_issue": job.tracking,
        "overlay_broke": job.overlay_broke,
        "notes": job.notes,
    }
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "outcome.json").write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    (job.out / "summary.md").write_text(summary(job), encoding="utf-8")
    github = os.environ.get("GITHUB_OUTPUT")
    if github:
        with open(github, "a", encoding="utf-8") as handle:
            handle.write(f"exit_code={code}\n")
            handle.write(f"gpu_targets={','.join(job.gpu_targets)}\n")
            handle.write(f"tracking_issue={'true' if job.tracking else ''}\n")
            handle.write(
                f"proposals={','.join(p['line'] for p in job.proposals if not p.get('error'))}\n"
            )


def summary(job: Job) -> str:
    """The job summary in Markdown (what GitHub shows on the run page)."""
    code = job.exit_code
    out = [f"# mla-seam nightly: {EXIT_CODES[code]} (exit {code})", ""]
    if job.broke:
        out += [f"**The job broke**: {job.broke}. This is not drift.", ""]
    out += ["| step | status | s | note |", "|---|---|---|---|"]
    out += [f"| {s.name} | {s.status} | {s.seconds} | {s.note} |" for s in job.steps]
    out.append("")
    if job.report:
        s = job.report["summary"]
        out.append(
            f"Drift: {s['supported']} of {s['tags']} tags supported"
            + (f"; needs work: {', '.join(s['needs_work_tags'])}" if s["needs_work"] else "")
            + f"; GPU verdicts: {s.get('gpu_verdicts', 0)}."
        )
    for label, items in (
        ("New or changed tags", job.new_tags),
        ("GPU targets", [f"{t}: {job.gpu_verdicts.get(t, 'not run')}" for t in job.gpu_targets]),
        ("Overlay broke on", job.overlay_broke),
        ("Tracking issue for", job.tracking),
        (
            "Proposed series",
            [f"{p['tag']} -> {p['folder']}" + (f" (failed: {p['error']})" if p.get("error") else "")
             for p in job.proposals],
        ),  # fmt: skip
        ("Notes", job.notes),
    ):
        if items:
            out += ["", f"**{label}**:", ""] + [f"- {item}" for item in items]
    out += ["", "Report: `drift/drift.md` (artifact); exit codes: "
            + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items())]  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


# --- the job ---------------------------------------------------------------------------------------


def run_job(args: argparse.Namespace) -> Job:
    """Run the steps of ``args.phase``; the job's record (never raises for a broken step)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(out)
    history_file = Path(args.history) if args.history else out / "history.jsonl"
    try:
        if args.phase in ("all", "cpu"):
            _cpu(job, args, history_file)
        if args.phase in ("all", "gpu"):
            _gpu(job, args)
    except JobBroke:
        pass
    if job.report is not None:
        # One history line per night: the gpu phase replaces the cpu phase's line of this run.
        drift.write_outputs(job.report, job.out / "drift", True, history_file)
    write_outcome(job)
    return job


def _cpu(job: Job, args: argparse.Namespace, history_file: Path) -> None:
    megatron: Dict[str, Any] = {}

    def discover_step(step: Step) -> None:
        if args.no_discover:
            step.status, step.note = "skipped", "--no-discover: the built-in release list"
            return
        job.discovered = discover(args.pre, subprocess.run)
        new = [r["version"] for r in job.discovered if r["version"] not in upstream.RELEASES]
        step.note = f"{len(job.discovered)} releases" + (f", new: {', '.join(new)}" if new else "")

    def remote_step(step: Step) -> None:
        known = drift.known_releases([r["version"] for r in job.discovered], include_pre=args.pre)
        if args.megatron:
            megatron["path"] = Path(args.megatron)
            if args.remote:
                megatron["end"] = fetch_remote(megatron["path"], args.remote)
                step.note = f"fetched tags and main of {args.remote}"
            else:
                step.status, step.note = "skipped", "no --remote: the clone's refs as they are"
        else:
            megatron["path"] = materialize_all(out_megatron(job.out), known)
            step.note = f"{len(known)} releases materialized from the sdists (no clone)"
        megatron.setdefault("end", releases.line_of(known[-1]))

    def drift_step(step: Step) -> None:
        include = [r["version"] for r in job.discovered if r["version"] not in upstream.RELEASES]
        tags = f"{args.since}..{megatron['end']}"
        try:
            doc = drift.build(
                megatron["path"],
                tags,
                baseline=BASELINE_LINE,
                include=include,
                include_pre=args.pre,
                gpu_results=Path(args.results) if args.results else None,
                history_file=history_file,
            )
        except SeamError as exc:
            raise JobBroke(f"drift sweep {tags} failed: {exc.message}") from None
        job.report = doc
        since = doc.get("since_previous")
        if since is None:
            job.new_tags = [str(e["tag"]) for e in doc["tags"]]
        else:
            job.new_tags = list(since["new_tags"]) + [c["tag"] for c in since["changed"]]
        step.note = f"{doc['summary']['tags']} tags, {doc['summary']['needs_work']} need work"

    def propose_step(step: Step) -> None:
        todo = plan(job.report, job.new_tags)
        job.overlay_broke = [str(e["tag"]) for e in todo["overlay"]]
        job.tracking = [str(e["tag"]) for e in todo["human"] + todo["overlay"]]
        md = drift.markdown(job.report)
        for entry in todo["propose"]:
            job.proposals.append(propose(entry, megatron["path"], job.out, md))
        if job.tracking:
            body = tracking_issue(job.report, todo["human"] + todo["overlay"], md)
            (job.out / "tracking-issue.md").write_text(body, encoding="utf-8")
        step.note = f"{len(job.proposals)} proposed, {len(job.tracking)} for the tracking issue"

    job.step("discover", discover_step)
    job.step("remote", remote_step)
    job.step("drift", drift_step)
    job.step("propose", propose_step)
    job.gpu_targets = gpu_targets(job.report, job.new_tags) if job.report else []


def out_megatron(out: Path) -> Path:
    """Where a job without a clone materializes its checkout (fresh every night)."""
    dest = out / "megatron"
    shutil.rmtree(dest, ignore_errors=True)
    return dest


def _gpu(job: Job, args: argparse.Namespace) -> None:
    def gpu_step(step: Step) -> None:
        if job.report is None:
            path = job.out / "drift" / "drift.json"
            if not path.is_file():
                raise JobBroke(f"no {path}: run the cpu phase first (same --out)")
            job.report = drift.load_report(path)
        targets = [t for t in (args.targets or "").split(",") if t] or job.gpu_targets
        job.gpu_targets = targets
        why = None if args.gpu == "on" else gpu_available()
        if args.gpu == "off" or why:
            step.status = "skipped"
            step.note = "--gpu off" if args.gpu == "off" else f"no GPU here: {why}"
            job.notes.append(f"GPU suite not run ({step.note}); the CPU report stands alone")
            return
        results = Path(args.results) if args.results else job.out / "results"
        base_from = Path(args.base_from) if args.base_from else None
        devices = list(range(gpu_count() or 1))
        job.gpu_verdicts = run_gpu(targets, results, job.out / "trees", base_from, devices)
        drift_gpu.attach(job.report, results)
        broke = [t for t, v in job.gpu_verdicts.items() if v == "overlay_broke"]
        job.overlay_broke = sorted(set(job.overlay_broke) | set(broke))
        step.note = ", ".join(f"{t} {v}" for t, v in job.gpu_verdicts.items()) or "no targets"

    job.step("gpu", gpu_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mla_seam.nightly``; the exit status of :data:`EXIT_CODES`."""
    parser = argparse.ArgumentParser(prog="python -m mla_seam.nightly", description=__doc__)
    parser.add_argument("--out", required=True, metavar="DIR", help="everything goes here")
    parser.add_argument("--megatron", metavar="CLONE", help="a Megatron-LM clone (else sdists)")
    parser.add_argument("--remote", metavar="NAME", help="fetch tags and main from this remote")
    parser.add_argument("--pre", action="store_true", help="include pre-releases (rc, dev)")
    parser.add_argument(
        "--since", default=FIRST_LINE, metavar="LINE", help=f"first line swept ({FIRST_LINE})"
    )
    parser.add_argument(
        "--no-discover", action="store_true", help="skip the package index (built-in list)"
    )
    parser.add_argument(
        "--history", metavar="FILE", help="history file (default OUT/history.jsonl)"
    )
    parser.add_argument("--gpu", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--phase", choices=("all", "cpu", "gpu"), default="all")
    parser.add_argument("--targets", metavar="TAG,TAG", help="GPU targets (default: new/changed)")
    parser.add_argument("--results", metavar="DIR", help="GPU results folder (default OUT/results)")
    parser.add_argument(
        "--base-from", metavar="DRIFT_JSON", help="the report that names the base release"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    job = run_job(args)
    sys.stdout.write(summary(job))
    return job.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
