"""Every verb on clones as CI makes them: blobless, treeless and shallow, with real git.

A local bare "upstream" (:func:`build_upstream`) stands in for NVIDIA/Megatron-LM: the 0.19.2
release (built from its PyPI sdist, tagged ``core_v0.19.2``), then upstream commits that move
three hooks of the core_v0.19 series (H4 moved down: offset; a context line of H3 edited two
lines away from it: a clean 3-way merge; the line H7 sits under rewritten: a conflict), the
release ``core_v0.20.0``, and ``main`` after it (the H7 change reverted, version 0.21.0). The
bare repository serves filters and fetches by id as GitHub does; the clones are made from it
with ``git clone --filter=...`` / ``--depth``. The bare upstream is :mod:`synthetic_upstream` (fixture ``upstream_remote`` in conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict

import pytest
from mla_seam import gitlayer
from support import TC, TL, edit, run, run_subprocess  # noqa: F401
from synthetic_upstream import (
    LM,
    PACKAGE_INFO,
    SPARSE,
    Upstream,
    build_upstream,
    commit_all,
)  # noqa: F401


def _clone(up: Upstream, dest: Path, **kwargs) -> Path:
    gitlayer.clone(up.url, dest, sparse=SPARSE, **kwargs)
    return dest


def _survey(capsys, tmp_path: Path, clone: Path, onto: str) -> dict:
    out = tmp_path / f"survey-{onto}.json"
    code, text = run(capsys, "rebase", "--megatron", str(clone), "--onto", onto, "--json", str(out))
    assert out.is_file(), text
    return dict(json.loads(out.read_text()), exit=code)


def _classes(doc: dict) -> Dict[str, str]:
    return {p["hook"]: p["class"] for p in doc["patches"]}


EXPECTED = {"H3": "three_way", "H4": "offset", "H7": "conflict"}


def test_blobless_clone_fetches_what_the_survey_reads(upstream_remote, tmp_path, capsys, caplog):
    clone = _clone(upstream_remote, tmp_path / "blobless", filter_spec="blob:none")
    repo = gitlayer.open_repo(clone)
    assert gitlayer.clone_shape(repo).kind == "blobless"
    lm_at_tag = gitlayer.blobs_at(repo, "core_v0.20.0", [LM])[LM]
    assert gitlayer.missing(repo, [lm_at_tag]) == [lm_at_tag]  # not there before the survey
    with caplog.at_level("INFO"):
        doc = _survey(capsys, tmp_path, clone, "core_v0.20.0")
    assert doc["exit"] == 16  # H7 conflicts: nothing written, said so
    assert {k: v for k, v in _classes(doc).items() if k in EXPECTED} == EXPECTED
    assert "fetching" in caplog.text and "blobless clone lacks" in caplog.text
    assert gitlayer.missing(repo, [lm_at_tag]) == []  # fetched into the clone's object store
    # History and culprits come from the clone's own tag of the line, and name only commits
    # between it and the target, each once.
    assert doc["history"] is True and doc["history_base"] == "core_v0.19.2"
    h7 = next(p for p in doc["patches"] if p["hook"] == "H7")
    assert [c["commit"] for c in h7["hunks"][0]["culprits"]] == [
        upstream_remote.commits["conflict"]
    ]
    h3 = next(p for p in doc["patches"] if p["hook"] == "H3")
    assert [c["commit"] for c in h3["hunks"][0]["culprits"]] == [
        upstream_remote.commits["three_way"]
    ]
    assert gitlayer.dirty_paths(repo, ["."]) == []  # the clone's work tree is untouched


def test_treeless_clone_becomes_blobless_once(upstream_remote, tmp_path, capsys):
    clone = _clone(upstream_remote, tmp_path / "treeless", filter_spec="tree:0")
    assert gitlayer.clone_shape(gitlayer.open_repo(clone)).kind == "treeless"
    doc = _survey(capsys, tmp_path, clone, "main")
    assert doc["exit"] == 0
    assert _classes(doc)["H3"] == "three_way" and _classes(doc)["H7"] == "exact"
    assert gitlayer.clone_shape(gitlayer.open_repo(clone)).kind == "blobless"


def test_shallow_clone_works_and_says_what_history_needs(upstream_remote, tmp_path, capsys, caplog):
    clone = _clone(upstream_remote, tmp_path / "shallow", depth=1)
    assert gitlayer.clone_shape(gitlayer.open_repo(clone)).shallow
    doc = _survey(capsys, tmp_path, clone, "main")
    assert doc["exit"] == 0 and _classes(doc)["H3"] == "three_way"
    assert doc["history"] is False
    assert "shallow clone" in doc["history_note"] and "fetch --unshallow" in doc["history_note"]
    h3 = next(p for p in doc["patches"] if p["hook"] == "H3")
    assert h3["hunks"][0]["culprits"] == []  # no commit is named that may not be between
    # A tag the shallow clone lacks and no sdist provides: exit 23, the fetch to run.
    code, _ = run(capsys, "rebase", "--megatron", str(clone), "--onto", "core_v0.20.0")
    assert code == 23
    assert "fetch --depth=1 origin tag core_v0.20.0" in caplog.text


def test_drift_on_a_blobless_clone(upstream_remote, tmp_path, capsys):
    clone = _clone(upstream_remote, tmp_path / "blobless", filter_spec="blob:none")
    out = tmp_path / "drift"
    code, text = run(
        capsys, "drift", "--megatron", str(clone), "--tags", "core_v0.19.2..core_v0.20.0",
        "--out", str(out), "--no-plot",
    )  # fmt: skip
    assert code == 17, text
    doc = json.loads((out / "drift.json").read_text())
    assert [e["tag"] for e in doc["tags"]] == ["core_v0.19.2", "core_v0.20.0"]
    assert doc["tags"][0]["verdict"] == "supported"


def test_unreachable_promisor_is_exit_23_with_the_command(upstream_remote, tmp_path, repo_bundle):
    """The clone's remote is gone: exit 23, the message says what to fetch; no traceback."""
    clone = _clone(upstream_remote, tmp_path / "blobless", filter_spec="blob:none")
    repo = gitlayer.open_repo(clone)
    repo.git.remote("set-url", "origin", str(tmp_path / "gone.git"))
    done = run_subprocess(
        {"MLA_SEAM_ROOT": str(repo_bundle)}, "rebase", "--megatron", str(clone), "--onto", "main"
    )
    assert done.returncode == 23, done.stderr
    assert "Traceback" not in done.stderr
    assert "blobless clone and lacks" in done.stderr and f"git -C {clone} fetch" in done.stderr


def test_apply_and_revert_on_a_blobless_clone(upstream_remote, tmp_path, capsys):
    """apply works in the clone itself, where git fetches what it lacks on demand."""
    clone = tmp_path / "blobless"
    gitlayer.clone(upstream_remote.url, clone, filter_spec="blob:none")
    repo = gitlayer.open_repo(clone)
    gitlayer.checkout_detached(repo, "core_v0.19.2")
    for args, code in ((["--check"], 0), ([], 0), (["--status"], 0), (["--revert"], 0)):
        assert run(capsys, "apply", *args, str(clone))[0] == code, args
    assert gitlayer.dirty_paths(repo, ["."]) == []


def test_port_header_bumps_last_update_and_records_the_merge():
    from mla_seam.survey.engine import port_header

    body = "Hook: H3 x\nWhy: y\n z\nLast-Update: 2026-11-27\n"
    merged = port_header(body, "2026-12-01", "3-way onto main (abc) from core_v0.19.2")
    assert merged == (
        "Hook: H3 x\nWhy: y\n z\nLast-Update: 2026-12-01\n"
        "Merged-3way: 3-way onto main (abc) from core_v0.19.2\n"
    )
    assert port_header(merged, "2026-12-02", None) == (
        "Hook: H3 x\nWhy: y\n z\nLast-Update: 2026-12-02\n"
    )
