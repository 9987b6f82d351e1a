"""The CPU phase: discover, fetch, sweep, and decide each moving target.

Steps (each a row of the summary): **discover** (new releases on the package index),
**remote** (tags and the followed branches from the clone's remote; a shallow clone is
deepened, partial clones stay partial), **drift** (the sweep, with the history of earlier
nights), **targets** (a proposal or a tracking-issue text per moving target, and which targets
the GPU job has to test: those whose hooked or probed files, series or adapter changed since
their last GPU run).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mla_seam import drift, gitlayer, paths, releases, upstream
from mla_seam.errors import SeamError
from mla_seam.nightly import propose, state, targets, texts
from mla_seam.nightly.job import Job, JobBroke, Step
from mla_seam.survey import load_lines, survey_paths

log = logging.getLogger(__name__)

BASELINE_LINE = "0.16"
FIRST_LINE = "0.13"
MAIN_BRANCH = releases.followed_ref("main")
#: Pre-releases a ``--pre`` night sweeps from the package index: the newest few that are newer
#: than every final release (what is coming), so the night stays bounded.
PRE_MAX = 3


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
    """Ask the package index for releases; an unreachable index breaks the job (never drift).

    Yanked files are dropped (``--pre`` lists them: PyPI's 0.18.1 and 0.19.1). With
    ``include_pre``, only the :data:`PRE_MAX` newest pre-releases newer than every final release
    are kept (PyPI lists hundreds of old ``.dev`` builds).
    """
    proc = run(discovery_command(include_pre), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        what = "the package index is unreachable" if proc.returncode == 15 else "discovery failed"
        raise JobBroke(f"{what} (mla-seam upstream list exit {proc.returncode}): {tail}")
    rows = [r for r in parse_discovery(proc.stdout) if not r.get("yanked")]  # never a target
    finals = [r for r in rows if not r["prerelease"]]
    if not include_pre:
        return finals
    newest = newest_final([r["version"] for r in finals])
    upcoming = [
        r
        for r in rows
        if r["prerelease"] and releases.version_key(r["version"]) > releases.version_key(newest)
    ]
    upcoming.sort(key=lambda r: releases.version_key(r["version"]))
    return finals + upcoming[-PRE_MAX:]


def newest_final(versions: Sequence[str]) -> str:
    """The newest final release among ``versions`` and the built-in list."""
    finals = [v for v in list(versions) + upstream.RELEASES if not releases.is_prerelease(v)]
    return max(finals, key=releases.version_key)


# --- 2. the git remote --------------------------------------------------------------------------


def fetch_remote(megatron: Path, remote: str, follow: Sequence[str]) -> str:
    """Fetch the tags and followed branches of ``remote`` into the clone; a note on its shape.

    Raises:
        JobBroke: not a clone, or the remote is unreachable.
    """
    import git  # pylint: disable=import-outside-toplevel

    repo = gitlayer.open_repo(megatron)
    if repo is None:
        raise JobBroke(f"--megatron {megatron} is not a git clone (the remote step needs one)")
    shape = gitlayer.clone_shape(repo)
    branches = {b: f"refs/heads/{releases.followed_ref(b)}" for b in follow}
    try:
        gitlayer.fetch_upstream(repo, remote, branches, unshallow=shape.shallow)
    except git.GitCommandError as exc:
        reason = (exc.stderr or str(exc)).strip().splitlines()[-1:] or ["git fetch failed"]
        raise JobBroke(f"git remote {remote!r} of {megatron} unreachable: {reason[0]}") from None
    note = f"{shape.kind} clone" + (", deepened to its whole history" if shape.shallow else "")
    return note


def materialize_all(dest: Path, versions: Sequence[str]) -> Path:
    """One checkout holding every release (from the mla-seam cache / the sdists)."""
    try:
        return upstream.get_many(list(versions), dest)
    except SeamError as exc:
        raise JobBroke(f"could not materialize the releases: {exc.message}") from None


# --- 4. targets ---------------------------------------------------------------------------------


def gpu_fingerprint(
    megatron: Optional[Path], target: targets.Target, series_digest: str
) -> Optional[str]:
    """What a GPU run of ``target`` depends on: the blobs of every hooked and probed file at
    the target, the series tested and the adapter (``None``: the target's tree is not here)."""
    files = survey_paths()
    blobs: Dict[str, str] = {}
    repos = []
    if megatron is not None:
        repos.append(gitlayer.open_repo(megatron))
    try:
        repos.append(gitlayer.open_repo(upstream.checkout_path(target.version)))
    except SeamError:
        pass
    for repo in repos:
        if repo is not None and gitlayer.resolve_commit(repo, target.commit):
            blobs = gitlayer.blobs_at(repo, target.commit, files)
            break
    else:
        return None
    adapter = gitlayer.hash_blobs(paths.overlay_dir(), [paths.ADAPTER_RELPATH])
    return targets.digest([blobs, series_digest, adapter])


def plan_gpu(
    target: targets.Target, megatron: Optional[Path], data: Mapping[str, Any]
) -> Dict[str, Any]:
    """Whether the GPU job tests ``target`` tonight, and why (or why not)."""
    if target.action == "human":
        return {"run": False, "why": "no series applies (a human has to port it)"}
    if target.proposal is not None:
        series_digest = str(target.proposal.get("fingerprint"))
    else:  # the checked-in series the patched tree gets: a moving target's own, else the line's
        name = target.moving or target.series
        found = [s for s in load_lines(paths.patches_dir(), strict=False) if s.name == name]
        series_digest = found[0].sha256 if found else name
    fingerprint = gpu_fingerprint(megatron, target, series_digest)
    last = (data["targets"].get(target.slug) or {}).get("gpu") or {}
    if fingerprint is not None and last.get("fingerprint") == fingerprint:
        return {
            "run": False,
            "fingerprint": fingerprint,
            "why": f"nothing the series or contracts touch changed since the GPU run of "
            f"{last.get('at', '?')} ({last.get('verdict', '?')})",
        }
    return {"run": True, "fingerprint": fingerprint, "why": "new or changed since the last GPU run"}


def decide(
    job: Job,
    report: Dict[str, Any],
    megatron: Path,
    follow: Sequence[str],
    data: Mapping[str, Any],
) -> List[targets.Target]:
    """Plan every moving target: proposal folders and tracking-issue texts under ``job.out``."""
    lines = load_lines(paths.patches_dir(), strict=False)
    entries = {str(e["tag"]): e for e in report["tags"]}
    md = drift.markdown(report)
    found = targets.moving_targets(report, follow, lines)
    for target in found:
        entry = entries[target.ref]
        targets.plan(target, entry, lines)
        if target.action == "ok" and target.moving:
            target.note = f"at the commit patches/{target.folder} was made from"
        if target.action == "propose":
            target.proposal = propose.propose(target, entry, megatron, job.out, md)
            if not target.proposal["ok"]:
                target.action = "human"
                target.reasons.insert(
                    0, f"rebase --write failed: {target.proposal.get('error', '?')}"
                )
            elif target.moving and target.proposal.get("unchanged"):
                # Only the snapshot commit would move: the checked-in series serves it.
                target.action, target.proposal = "ok", None
                target.note = f"the rebase writes the checked-in patches/{target.folder}"
        if target.action == "human":
            body, whole = texts.issue_body(target, entry)
            folder = job.out / "issues"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{target.slug}.md").write_text(body, encoding="utf-8")
            (folder / f"{target.slug}-full.md").write_text(whole, encoding="utf-8")
            target.issue = {
                "title": texts.issue_title(target),
                "file": f"issues/{target.slug}.md",
                "fingerprint": targets.issue_digest(target, entry),
            }
        if target.kind == "overlay":
            job.overlay_broke.append(target.name)
        target.gpu = plan_gpu(target, megatron, data)
    return found


# --- the phase ------------------------------------------------------------------------------------


def run(job: Job, args: Any, state_dir: Path) -> None:
    """Run the CPU steps into ``job`` (raises :class:`JobBroke` when one breaks)."""
    megatron: Dict[str, Any] = {}
    follow = [b for b in (args.follow or "").split(",") if b.strip()]
    history_file = state_dir / "history.jsonl"
    data = state.load(state_dir)

    def discover_step(step: Step) -> None:
        if args.no_discover:
            step.status, step.note = "skipped", "--no-discover: the built-in release list"
            return
        job.discovered = discover(args.pre, subprocess.run)
        new = [r["version"] for r in job.discovered if r["version"] not in upstream.RELEASES]
        step.note = f"{len(job.discovered)} releases" + (f", new: {', '.join(new)}" if new else "")

    def remote_step(step: Step) -> None:
        versions = [r["version"] for r in job.discovered]
        known = drift.known_releases(versions, include_pre=False)
        if args.megatron:
            megatron["path"] = Path(args.megatron)
            if args.remote:
                step.note = fetch_remote(megatron["path"], args.remote, follow)
                step.note += f"; fetched tags and {', '.join(follow) or 'no branch'}"
            else:
                step.status, step.note = "skipped", "no --remote: the clone's refs as they are"
            megatron["branches"] = [releases.followed_ref(b) for b in follow]
        else:
            megatron["path"] = materialize_all(out_megatron(job.out), known)
            megatron["branches"] = []
            step.note = f"{len(known)} releases materialized from the sdists (no clone)"

    def drift_step(step: Step) -> None:
        branches = megatron["branches"]
        include = [r["version"] for r in job.discovered if r["version"] not in upstream.RELEASES]
        end = MAIN_BRANCH if MAIN_BRANCH in branches else releases.line_of(newest_final(include))
        tags = f"{args.since}..{end}"
        try:
            doc = drift.build(
                megatron["path"],
                tags,
                baseline=BASELINE_LINE,
                include=include,
                include_pre=args.pre,
                pre_after=newest_final(include) if args.pre else None,
                gpu_results=gpu_results(args),
                history_file=history_file,
                also=[b for b in branches if b != end],
                sweep_cache=None if args.no_sweep_cache else paths.cache_dir() / "sweeps",
            )
        except SeamError as exc:
            raise JobBroke(f"drift sweep {tags} failed: {exc.message}") from None
        job.report = doc
        since = doc.get("since_previous")
        if since is None:
            job.new_tags = [str(e["tag"]) for e in doc["tags"]]
        else:
            job.new_tags = list(since["new_tags"]) + [c["tag"] for c in since["changed"]]
        changed = since is None or bool(
            since["new_tags"] or since["removed_tags"] or since["changed"]
        )
        drift.write_outputs(doc, job.out / "drift", not args.no_plot, history_file, append=changed)
        step.note = f"{doc['summary']['tags']} tags, {doc['summary']['needs_work']} need work" + (
            "" if changed else "; nothing changed since the last recorded night"
        )

    def targets_step(step: Step) -> None:
        found = decide(job, job.report, megatron["path"], follow, data)
        job.targets = [t.to_json() for t in found]
        job.gpu_targets = [t.slug for t in found if t.gpu and t.gpu.get("run")]
        plan = {
            "upstream_url": upstream_url(megatron["path"], args.remote),
            "follow": follow,
            "targets": job.targets,
        }
        (job.out / "targets.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        counts = {a: sum(1 for t in found if t.action == a) for a in ("propose", "human", "ok")}
        step.note = ", ".join(f"{n} {a}" for a, n in counts.items()) + (
            f"; GPU: {', '.join(job.gpu_targets) or 'nothing changed'}"
        )

    job.step("discover", discover_step)
    job.step("remote", remote_step)
    job.step("drift", drift_step)
    job.step("targets", targets_step)


def gpu_results(args: Any) -> Optional[Path]:
    """The GPU results the drift report attaches: ``--results``, else the project's committed
    ``results/`` (``results/<tag>/<card>/verdict.json``; main's and dev's under their names),
    else none."""
    if args.results:
        return Path(args.results)
    committed = Path(args.project) / "results"
    return committed if committed.is_dir() else None


def upstream_url(megatron: Optional[Path], remote: Optional[str]) -> Optional[str]:
    """The URL the GPU job fetches targets from (the clone's remote)."""
    if megatron is None:
        return None
    repo = gitlayer.open_repo(megatron)
    return gitlayer.remote_url(repo, remote or "origin") if repo is not None else None


def out_megatron(out: Path) -> Path:
    """Where a job without a clone materializes its checkout (fresh every night)."""
    dest = out / "megatron"
    shutil.rmtree(dest, ignore_errors=True)
    return dest
