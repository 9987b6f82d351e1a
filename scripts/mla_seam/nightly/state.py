"""What the nightly job remembers between nights, and where it keeps it.

Three files (:data:`FILES`) in a folder:

* ``state.json``: per target what was published (proposal fingerprint, branch head, pull
  request, tracking issue and what it said, the GPU verdict reported) and the GPU
  fingerprint last tested;
* ``history.jsonl``: the drift report's history (``mla-seam drift --history``): one line per
  night on which something changed;
* ``gpu-history.jsonl``: one line per GPU run (target, fingerprint, verdict).

The folder travels in the workflow's artifact and lives on a data branch of the project's own
repository (:data:`BRANCH`): the publishing jobs commit it there (never forced: a commit on top
of the branch's head), the next night checks it out. It survives cache evictions and artifact
expiry; a repository without the branch starts empty.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import git
from mla_seam import gitlayer

log = logging.getLogger(__name__)

BRANCH = "mla-seam/nightly-state"
FILES = ("state.json", "history.jsonl", "gpu-history.jsonl")
STATE_VERSION = 1
BOT = ("mla-seam nightly", "mla-seam-nightly@users.noreply.github.com")


def empty() -> Dict[str, Any]:
    """A state with nothing published yet."""
    return {"state_version": STATE_VERSION, "targets": {}}


def load(folder: Path) -> Dict[str, Any]:
    """``state.json`` of ``folder`` (a missing or unreadable file: an empty state, logged)."""
    path = Path(folder) / "state.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty()
    except (OSError, ValueError) as exc:
        log.warning(
            "mla-seam nightly: %s is unreadable (%s); starting from an empty state", path, exc
        )
        return empty()
    if not isinstance(data, dict) or data.get("state_version") != STATE_VERSION:
        log.warning("mla-seam nightly: %s is not a state file of this version; ignored", path)
        return empty()
    data.setdefault("targets", {})
    return data


def save(folder: Path, data: Mapping[str, Any]) -> None:
    """Write ``state.json`` (stable bytes: sorted keys, so an unchanged state is unchanged)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    (folder / "state.json").write_text(text, encoding="utf-8")


def target(data: Dict[str, Any], slug: str) -> Dict[str, Any]:
    """The record of one target (created empty)."""
    return data["targets"].setdefault(slug, {})


def copy(source: Optional[Path], dest: Path) -> None:
    """Copy the state files of ``source`` into ``dest`` (no-op when they are the same folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    if source is None or not Path(source).is_dir():
        return
    if Path(source).resolve() == dest.resolve():
        return
    for name in FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, dest / name)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Add one JSON line to ``path`` (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


# --- the data branch ----------------------------------------------------------------------------


def read_branch(repo: git.Repo, remote: str, dest: Path, branch: str = BRANCH) -> bool:
    """Copy the state files of ``remote``'s ``branch`` into ``dest``; ``False``: no such branch."""
    head = gitlayer.fetch_ref(repo, remote, f"refs/heads/{branch}")
    dest.mkdir(parents=True, exist_ok=True)
    if head is None:
        return False
    for name in FILES:
        data = gitlayer.read_file_at(repo, head, name)
        if data is not None:
            (dest / name).write_bytes(data)
    return True


def push_branch(
    repo: git.Repo, remote: str, folder: Path, message: str, branch: str = BRANCH
) -> str:
    """Commit ``folder``'s state files on top of ``remote``'s ``branch`` and push (never forced).

    Returns:
        ``"unchanged"`` (the branch already holds these bytes), ``"pushed <commit>"``, or
        ``"refused: <why>"`` (someone pushed in between: the next night tries again).
    """
    ref = f"refs/heads/{branch}"
    head = gitlayer.fetch_ref(repo, remote, ref)
    files: Dict[str, Optional[bytes]] = {}
    for name in FILES:
        path = Path(folder) / name
        files[name] = path.read_bytes() if path.is_file() else None
    if head is not None and all(
        gitlayer.read_file_at(repo, head, name) == data for name, data in files.items()
    ):
        return "unchanged"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = gitlayer.commit_files(
        repo, head, {k: v for k, v in files.items() if v is not None or head}, message, BOT, now
    )
    ok, text = gitlayer.push_ref(repo, remote, commit, ref)
    return f"pushed {commit[:12]}" if ok else f"refused: {text.splitlines()[-1] if text else '?'}"
