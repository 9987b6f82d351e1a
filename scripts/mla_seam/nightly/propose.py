"""A proposal: ``mla-seam rebase --write --accept-three-way`` of one target in a bundle copy.

``<out>/proposals/<slug>/`` receives the whole bundle the series was written into
(``bundle/patches``, ``bundle/overlay``: what the GPU job stages the proposed series from),
the rebase's output and JSON survey, ``proposal.json`` and the pull-request body (``PR.md``,
under the size limit, and ``PR-full.md``). The repository's own ``patches/`` is never written.

The series folder is the target's (:attr:`~mla_seam.nightly.targets.Target.folder`):
``patches/core_v0.20/`` for a new release, ``patches/main/`` for upstream main (the rebase onto
``upstream-main`` writes it, as ``rebase --onto main`` does). The record says ``unchanged``
when the written folder is the checked-in one but for the snapshot commit it records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping

from mla_seam import paths
from mla_seam.nightly import texts
from mla_seam.nightly.targets import Target, folder_digest, proposal_digest


def bundle_copy(dest: Path) -> Path:
    """A copy of this mla-seam's bundle (``patches/``, ``overlay/``) at ``dest``."""
    root = paths.bundle_root()
    for name in ("patches", "overlay"):
        shutil.copytree(root / name, dest / name, symlinks=True)
    return dest


def rebase_command(target: Target, megatron: Path, survey_json: Path) -> list:
    """The rebase the proposal runs (the same a human would, with ``--write``)."""
    return [
        sys.executable, "-m", "mla_seam", "rebase", "--megatron", str(megatron),
        "--onto", target.ref, "--from", target.series, "--write", "--accept-three-way",
        "--json", str(survey_json),
    ]  # fmt: skip


def propose(
    target: Target, entry: Mapping[str, Any], megatron: Path, out: Path, drift_md: str
) -> Dict[str, Any]:
    """Write the series of ``target`` into a bundle copy; return the proposal record.

    The record has ``ok`` (the rebase wrote a series), ``folder`` (relative to ``out``),
    ``line_dir`` (the series folder), ``fingerprint``
    (:func:`~mla_seam.nightly.targets.proposal_digest`), ``unchanged`` (the checked-in folder
    has that fingerprint too), ``exit`` and, on failure, ``error``.
    """
    folder = out / "proposals" / target.slug
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bundle = bundle_copy(folder / "bundle")
    survey = folder / "survey.json"
    env = dict(os.environ, MLA_SEAM_ROOT=str(bundle))
    proc = subprocess.run(
        rebase_command(target, megatron, survey),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    output = (proc.stdout + ("\n" + proc.stderr if proc.stderr.strip() else "")).strip()
    (folder / "rebase.txt").write_text(output + "\n", encoding="utf-8")
    line_dir = target.folder
    record: Dict[str, Any] = {
        "ok": proc.returncode == 0,
        "exit": proc.returncode,
        "folder": str(folder.relative_to(out)),
        "line_dir": line_dir,
    }
    written = bundle / "patches" / line_dir
    if proc.returncode != 0 or not written.is_dir():
        tail = [ln for ln in output.splitlines() if ln.strip()][-3:]
        record["ok"] = False
        record["error"] = " / ".join(tail) or f"rebase exit {proc.returncode}"
        return record
    files = {p.name: p.read_bytes() for p in sorted(written.iterdir()) if p.is_file()}
    record["fingerprint"] = proposal_digest(files)
    record["unchanged"] = record["fingerprint"] == folder_digest(paths.patches_dir() / line_dir)
    record["files"] = sorted(files)
    record["title"] = texts.pr_title(target, line_dir)
    body, whole = texts.pr_body(target, entry, record, proc.stdout, drift_md)
    (folder / "PR.md").write_text(body, encoding="utf-8")
    (folder / "PR-full.md").write_text(whole, encoding="utf-8")
    (folder / "proposal.json").write_text(
        json.dumps(dict(record, target=target.name, commit=target.commit), indent=2) + "\n",
        encoding="utf-8",
    )
    return record
