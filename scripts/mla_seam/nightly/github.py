"""The one thin layer between the nightly job and GitHub: ``gh api`` calls, recorded.

Every call the job makes to GitHub goes through :class:`GitHub`: one ``gh api`` command line
per REST call (``GH_TOKEN`` authenticates it; ``gh`` is on every GitHub-hosted runner), the
payload as JSON on stdin. :attr:`GitHub.calls` records each command line and payload, and
``<out>/github-calls.jsonl`` keeps them, so a run (and a test) shows exactly what was asked of
GitHub. With ``dry_run`` nothing is sent: each call is recorded and answered the way GitHub
answers an empty repository (new numbers for what is created, nothing found by a search),
which is how ``ci/nightly.sh`` and the tests run the publishing steps without GitHub.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from mla_seam.errors import GitHubError

#: ``(argv, stdin bytes) -> stdout``: how a call is made (``gh`` itself unless replaced).
Runner = Callable[[Sequence[str], Optional[bytes]], str]

LABEL_COLOR = "D93F0B"


def run_gh(argv: Sequence[str], payload: Optional[bytes]) -> str:
    """Run one ``gh`` command line; its stdout.

    Raises:
        GitHubError: ``gh`` is missing or the call failed (the message has GitHub's answer).
    """
    try:
        done = subprocess.run(
            list(argv), input=payload, capture_output=True, check=False, timeout=120
        )
    except FileNotFoundError:
        raise GitHubError(
            "gh (the GitHub CLI) is not installed",
            "install gh, or run the publish phase in Actions",
        ) from None
    except subprocess.TimeoutExpired:
        raise GitHubError(
            f"{' '.join(argv[:4])} timed out after 120 s", "run the job again"
        ) from None
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
        raise GitHubError(
            f"{' '.join(argv[:5])} failed (exit {done.returncode}): {err[-300:]}",
            "check GH_TOKEN's permissions (ci/README.md: contents, pull requests and issues: "
            "write) and the repository name",
        )
    return done.stdout.decode("utf-8", "replace")


class GitHub:
    """REST calls of the nightly job on one repository (``owner/name``)."""

    def __init__(
        self,
        repo: str,
        runner: Runner = run_gh,
        dry_run: bool = False,
        log_path: Optional[Path] = None,
    ) -> None:
        self.repo = repo
        self.runner = runner
        self.dry_run = dry_run
        self.log_path = log_path
        self.calls: List[Dict[str, Any]] = []
        self._next_number = 1

    # -- the one call --

    def api(
        self,
        method: str,
        path: str,
        payload: Optional[Dict[str, Any]] = None,
        missing_ok: bool = False,
    ) -> Any:
        """``gh api --method METHOD repos/OWNER/NAME/PATH`` with ``payload`` as JSON on stdin.

        ``missing_ok``: GitHub's 404 answers ``None`` instead of raising.
        """
        argv = ["gh", "api", "--method", method, f"repos/{self.repo}/{path}"]
        data = None
        if payload is not None:
            argv += ["--input", "-"]
            data = json.dumps(payload, sort_keys=True).encode("utf-8")
        record = {"argv": argv, "payload": payload}
        self.calls.append(record)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.dry_run:
            return self._dry_answer(method, path)
        try:
            text = self.runner(argv, data)
        except GitHubError as err:
            if missing_ok and "404" in err.message:
                return None
            raise
        return json.loads(text) if text.strip() else None

    def _dry_answer(self, method: str, path: str) -> Any:
        if method == "GET":
            if path.split("?")[0].endswith(("pulls", "issues", "comments")):
                return []
            return None if path.startswith("labels/") else {}
        if method == "POST" and path.endswith(("pulls", "issues")):
            number, self._next_number = self._next_number, self._next_number + 1
            return {"number": number, "html_url": f"https://github.com/{self.repo}/{number}"}
        return {}

    # -- what the job asks --

    def ensure_label(self, name: str, description: str) -> None:
        """Create label ``name`` unless it exists."""
        if not self.api("GET", f"labels/{name}", missing_ok=True):
            self.api(
                "POST",
                "labels",
                {"name": name, "color": LABEL_COLOR, "description": description[:100]},
            )

    def open_pull(self, head: str) -> Optional[int]:
        """The number of the open pull request from branch ``head`` of this repository."""
        owner = self.repo.split("/", 1)[0]
        rows = self.api("GET", f"pulls?state=open&head={owner}:{head}") or []
        return int(rows[0]["number"]) if rows else None

    def create_pull(self, head: str, base: str, title: str, body: str) -> int:
        """Open a pull request; its number."""
        made = self.api(
            "POST",
            "pulls",
            {
                "head": head,
                "base": base,
                "title": title,
                "body": body,
                "maintainer_can_modify": True,
            },
        )
        return int(made["number"])

    def update_pull(self, number: int, body: str) -> None:
        """Replace a pull request's description."""
        self.api("PATCH", f"pulls/{number}", {"body": body})

    def comment(self, number: int, body: str) -> None:
        """Comment on an issue or pull request (people watching it are notified)."""
        self.api("POST", f"issues/{number}/comments", {"body": body})

    def create_issue(self, title: str, body: str, labels: Sequence[str]) -> int:
        """Open an issue; its number."""
        made = self.api("POST", "issues", {"title": title, "body": body, "labels": list(labels)})
        return int(made["number"])

    def update_issue(
        self, number: int, body: Optional[str] = None, state: Optional[str] = None
    ) -> None:
        """Replace an issue's description and/or set its state (``open``, ``closed``)."""
        payload: Dict[str, Any] = {}
        if body is not None:
            payload["body"] = body
        if state is not None:
            payload["state"] = state
            if state == "closed":
                payload["state_reason"] = "completed"
        self.api("PATCH", f"issues/{number}", payload)

    def issue_state(self, number: int) -> str:
        """``open`` or ``closed`` (a deleted issue: ``closed``; a dry run says ``open``)."""
        if self.dry_run:
            self.api("GET", f"issues/{number}")
            return "open"
        found = self.api("GET", f"issues/{number}", missing_ok=True) or {}
        return str(found.get("state") or "closed")
