"""The publishing phases: proposals as pull requests, tracking issues, GPU verdicts.

**publish** (after the CPU phase): for each proposal whose fingerprint changed, a commit with
the proposed line folder on branch ``mla-seam/propose/<target>`` of the project's repository
(a new branch from the default branch, or a commit on top of the job's own last commit: never
forced, never over someone else's commits: then the pull request gets a comment instead), and
its pull request opened or updated; for each target that needs a human, its tracking issue
opened, or updated with a comment saying what changed (an edit alone notifies nobody), and
closed with a comment once the target no longer needs a human. Nothing changed: no call.

**report** (after the GPU phase): each target's GPU verdict as a comment on its pull request
and open tracking issue, when it differs from the one reported last; the GPU history.

Both keep what they did in the state (:mod:`mla_seam.nightly.state`) and, with
``--push-state``, commit it to the data branch.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import git
from mla_seam import gitlayer
from mla_seam.nightly import state, texts
from mla_seam.nightly.github import GitHub
from mla_seam.nightly.job import Job, JobBroke, Step
from mla_seam.nightly.targets import Target

log = logging.getLogger(__name__)

LABEL = "mla-seam-drift"
TRAILER = "Mla-Seam-Proposal:"
#: What a pull request opened with the workflow's own token loses.
TOKEN_WARNING = (
    "the pull request was opened with github.token: GitHub starts no workflow for it, so no "
    "CI runs on the proposal; set up the GitHub App or the MLA_SEAM_BOT_TOKEN secret "
    "(ci/README.md)"
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Publisher:
    """Publishes one night's targets; every GitHub call goes through ``gh``."""

    def __init__(
        self,
        out: Path,
        data: Dict[str, Any],
        gh: GitHub,
        project: git.Repo,
        remote: str,
        base_branch: str,
        token_kind: str = "app",
    ) -> None:
        self.out = out
        self.data = data
        self.gh = gh
        self.project = project
        self.remote = remote
        self.base_branch = base_branch
        self.token_kind = token_kind
        self.done: List[str] = []
        self.warnings: List[str] = []
        self._label = False

    # -- proposals --

    def proposal(self, target: Target) -> None:
        """Push the proposal's branch and open or update its pull request, if it changed."""
        assert target.proposal is not None
        record = state.target(self.data, target.slug)
        last = record.get("proposal") or {}
        fingerprint = target.proposal["fingerprint"]
        if last.get("fingerprint") == fingerprint:
            return  # unchanged since it was published: no push, no call
        ref = f"refs/heads/{target.branch}"
        head = gitlayer.fetch_ref(self.project, self.remote, ref)
        files = self._line_files(target)
        if head is None:
            parent = gitlayer.fetch_ref(self.project, self.remote, f"refs/heads/{self.base_branch}")
            if parent is None:
                raise JobBroke(f"{self.remote} has no branch {self.base_branch} to propose onto")
        else:
            email, message = gitlayer.commit_author(self.project, head)
            if email != state.BOT[1] or TRAILER not in message:
                self._others_commits(target, record, head, fingerprint)
                return
            if f"{TRAILER} {fingerprint}" in message:  # already there (a state that was lost)
                record["proposal"] = dict(last, fingerprint=fingerprint, head=head)
                return
            parent = head
        folder = f"patches/{target.proposal['line_dir']}"
        changes: Dict[str, Optional[bytes]] = {
            p: None for p in gitlayer.files_under(self.project, parent, folder)
        }
        changes.update({f"{folder}/{name}": data for name, data in files.items()})
        message = (
            f"patches: serve {target.label} with patches/{target.proposal['line_dir']}/ "
            "(mla-seam nightly)"
            f"\n\nmla-seam rebase --write --accept-three-way onto {target.name} "
            f"({target.commit}), from {target.series}.\n\n"
            f"{TRAILER} {fingerprint}\nMla-Seam-Target: {target.name} {target.commit}\n"
        )
        commit = gitlayer.commit_files(self.project, parent, changes, message, state.BOT, _now())
        pushed, text = gitlayer.push_ref(self.project, self.remote, commit, ref)
        if not pushed:
            self.done.append(f"{target.name}: push of {target.branch} refused ({text[-200:]})")
            return
        body = (self.out / target.proposal["folder"] / "PR.md").read_text(encoding="utf-8")
        number = self.gh.open_pull(target.branch)
        if number is None:
            number = self.gh.create_pull(
                target.branch, self.base_branch, target.proposal["title"], body
            )
            what = f"opened pull request #{number}"
        else:
            self.gh.update_pull(number, body)
            self.gh.comment(
                number,
                f"The nightly pushed an updated proposal for {target.label} "
                f"(`{target.commit[:12]}`, fingerprint `{fingerprint}`): {commit[:12]}.",
            )
            what = f"updated pull request #{number}"
        if self.token_kind == "github-token":
            self.warnings.append(f"{target.name}: {TOKEN_WARNING}")
        record["proposal"] = {
            "fingerprint": fingerprint,
            "head": commit,
            "pr": number,
            "branch": target.branch,
            "at": _now(),
        }
        self.done.append(f"{target.name}: pushed {target.branch} ({commit[:12]}), {what}")

    def _line_files(self, target: Target) -> Dict[str, bytes]:
        assert target.proposal is not None
        folder = (
            self.out
            / target.proposal["folder"]
            / "bundle"
            / "patches"
            / target.proposal["line_dir"]
        )
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def _others_commits(
        self, target: Target, record: Dict[str, Any], head: str, fingerprint: str
    ) -> None:
        """Someone else's commits are on the proposal branch: never pushed over; said once."""
        last = record.setdefault("proposal", {})
        if last.get("notified") == fingerprint:
            return
        number = last.get("pr") or self.gh.open_pull(target.branch)
        if number:
            self.gh.comment(
                number,
                f"Upstream moved: the nightly has a new proposal for {target.label} "
                f"(`{target.commit[:12]}`, fingerprint `{fingerprint}`). It did not push it: "
                f"the branch's head `{head[:12]}` is not the nightly's commit, and it never "
                "pushes over other people's commits. The proposed folder is "
                f"`{target.proposal['folder']}` in the `{texts.ARTIFACT}` artifact of this run.",
            )
        last["notified"] = fingerprint
        self.done.append(
            f"{target.name}: new proposal not pushed ({target.branch} has others' commits)"
        )

    # -- tracking issues --

    def issue(self, target: Target) -> None:
        """Open the target's tracking issue, or update it with a comment when it changed."""
        assert target.issue is not None
        record = state.target(self.data, target.slug)
        last = record.get("issue") or {}
        fingerprint = target.issue["fingerprint"]
        if last.get("open") and last.get("fingerprint") == fingerprint:
            return  # nothing new: no edit, no comment
        body = (self.out / target.issue["file"]).read_text(encoding="utf-8")
        number = last.get("number") if last.get("open") else None
        if number and self.gh.issue_state(number) == "open":
            self.gh.update_issue(number, body=body)
            self.gh.comment(number, texts.change_comment(last, target))
            what = f"updated issue #{number} (comment)"
        else:
            self._ensure_label()
            number = self.gh.create_issue(target.issue["title"], body, [LABEL])
            what = f"opened issue #{number}"
        record["issue"] = {
            "number": number,
            "open": True,
            "fingerprint": fingerprint,
            "classes": target.classes,
            "reasons": target.reasons,
            "at": _now(),
        }
        self.done.append(f"{target.name}: {what}")

    def close_resolved(self, tonight: Mapping[str, Target]) -> None:
        """Close, with a comment, the open issues of targets that no longer need a human."""
        for slug, record in sorted(self.data["targets"].items()):
            last = record.get("issue") or {}
            target = tonight.get(slug)
            if not last.get("open") or (target is not None and target.action == "human"):
                continue
            if target is None:
                why = "it is no longer a moving target (a series lists it, or it is not followed)"
            elif target.action == "propose":
                pr = (record.get("proposal") or {}).get("pr")
                why = "every hook carries again: the nightly proposes the series" + (
                    f" in #{pr}" if pr else ""
                )
            else:
                why = f"the checked-in series serves {target.label}"
            self.gh.comment(last["number"], f"Resolved: {why}. Closing.")
            self.gh.update_issue(last["number"], state="closed")
            last["open"] = False
            self.done.append(f"{slug}: closed issue #{last['number']}")

    def _ensure_label(self) -> None:
        if not self._label:
            self.gh.ensure_label(LABEL, "mla-seam: upstream drift that needs a human")
            self._label = True


def run_publish(job: Job, args: Any, state_dir: Path, gh: GitHub) -> None:
    """The publish phase into ``job``."""

    def publish_step(step: Step) -> None:
        plan = json.loads((job.out / "targets.json").read_text(encoding="utf-8"))
        found = [Target.from_json(t) for t in plan["targets"]]
        job.targets = plan["targets"]
        data = state.load(state_dir)
        project = _project(args)
        publisher = Publisher(
            job.out, data, gh, project, args.project_remote, args.base_branch, args.token_kind
        )
        for target in found:
            if target.action == "propose" and target.proposal and target.proposal.get("ok"):
                publisher.proposal(target)
            elif target.action == "human" and target.issue:
                publisher.issue(target)
        publisher.close_resolved({t.slug: t for t in found})
        state.save(state_dir, data)
        job.published = publisher.done
        for warning in publisher.warnings:
            job.notes.append(f"warning: {warning}")
            print(f"::warning::{warning}")
        step.note = f"{len(publisher.done)} change(s), {len(gh.calls)} GitHub call(s)"

    job.step("publish", publish_step)
    _push_state(job, args, state_dir, "publish")


def run_report(job: Job, args: Any, state_dir: Path, gh: GitHub) -> None:
    """The report phase into ``job``: GPU verdicts on pull requests and tracking issues."""

    def report_step(step: Step) -> None:
        path = job.out / "gpu" / "verdicts.json"
        if not path.is_file():
            step.status, step.note = "skipped", "no GPU verdicts (the GPU job did not run)"
            return
        verdicts = json.loads(path.read_text(encoding="utf-8"))
        plan = json.loads((job.out / "targets.json").read_text(encoding="utf-8"))
        by_slug = {t["slug"]: Target.from_json(t) for t in plan["targets"]}
        data = state.load(state_dir)
        for slug, verdict in sorted(verdicts.items()):
            target = by_slug.get(slug)
            record = state.target(data, slug)
            last = record.get("gpu") or {}
            record["gpu"] = {
                k: verdict.get(k) for k in ("fingerprint", "verdict", "at", "commit", "dry_run")
            }
            state.append_jsonl(state_dir / "gpu-history.jsonl", dict(verdict, target=slug))
            job.gpu_verdicts[slug] = str(verdict.get("verdict"))
            if verdict.get("verdict") == "overlay_broke":
                job.overlay_broke.append(slug)
            same = (last.get("fingerprint"), last.get("verdict")) == (
                verdict.get("fingerprint"),
                verdict.get("verdict"),
            )
            if same or verdict.get("dry_run") or target is None:
                continue
            body = texts.gpu_comment(target, verdict)
            for kind, key in (("proposal", "pr"), ("issue", "number")):
                number = (record.get(kind) or {}).get(key)
                if number and (kind == "proposal" or (record.get(kind) or {}).get("open")):
                    gh.comment(number, body)
                    job.published.append(f"{slug}: GPU verdict on #{number}")
        state.save(state_dir, data)
        step.note = ", ".join(f"{s} {v}" for s, v in job.gpu_verdicts.items())

    job.step("report", report_step)
    _push_state(job, args, state_dir, "report")


def _project(args: Any) -> git.Repo:
    repo = gitlayer.open_repo(Path(args.project))
    if repo is None:
        raise JobBroke(f"--project {args.project} is not a git checkout of this repository")
    return repo


def _push_state(job: Job, args: Any, state_dir: Path, phase: str) -> None:
    if not getattr(args, "push_state", False):
        return

    def push_step(step: Step) -> None:
        done = state.push_branch(
            _project(args), args.project_remote, state_dir, f"nightly {phase}: state"
        )
        step.note = f"{state.BRANCH}: {done}"
        if done.startswith("refused"):
            job.notes.append(f"the state was not saved ({done}); the next night repeats")

    job.step("state", push_step)
