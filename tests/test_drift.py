"""``mla-seam drift`` on real checkouts built from PyPI sdists: schema, outputs, exit codes."""

from __future__ import annotations

import json
import shutil

import pytest
from mla_seam import drift, gitlayer, upstream
from test_rebase import (  # noqa: F401 (fixtures)
    MLA,
    REPO,
    bundle,
    combo,
    commit_all,
    edit,
    files_of,
    repo_state,
    run,
    run_subprocess,
)

RESULTS = REPO / "results" / "drift"


def _drift(capsys, *args: str):
    return run(capsys, "drift", *args)


def test_report_validates_and_renders(combo, bundle, tmp_path, capsys):
    before = repo_state(combo)
    out = tmp_path / "out"
    code, text = _drift(
        capsys,
        "--megatron",
        str(combo),
        "--tags",
        "0.18.2..0.19",
        "--baseline",
        "0.16",
        "--out",
        str(out),
    )
    assert code == 0, text
    doc = json.loads((out / "drift.json").read_text())
    drift.validate(doc)
    assert [e["tag"] for e in doc["tags"]] == ["core_v0.18.2", "core_v0.19.0", "core_v0.19.2"]
    sources = {e["tag"]: e["source"] for e in doc["tags"]}
    assert sources["core_v0.19.0"].startswith("mla-seam cache")  # not in the checkout: materialized
    assert sources["core_v0.19.2"] == "checkout"
    assert all(e["verdict"] == "supported" and e["gpu"] is None for e in doc["tags"])
    entry = doc["tags"][1]
    assert {p["hook"]: p["class"] for p in entry["baseline"]["patches"]}["H6"] == "obsolete"
    assert {p["hook"] for p in entry["patches"]} == {"H1", "H2", "H3", "H4", "H5", "H8", "H9"}
    assert any(c["probe"] == "mla.qk_norm_resolver" for c in entry["contract_changes"])
    assert doc["lines"]["0.19"]["obsolete"] == ["H6"] and doc["lines"]["0.19"]["line_only"] == [
        "H5",
        "H9",
    ]
    md = (out / "drift.md").read_text()
    assert "| core_v0.19.0 | core_v0.19 |" in md and "## Per release line" in md
    assert "<table" in (out / "drift.html").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert repo_state(combo) == before


def test_report_is_deterministic(combo, bundle, tmp_path, capsys):
    docs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert (
            _drift(
                capsys,
                "--megatron",
                str(combo),
                "--tags",
                "0.17.1..0.17.1",
                "--out",
                str(out),
                "--no-plot",
            )[0]
            == 0
        )
        docs.append({k: v for k, v in files_of(out).items()})
    assert docs[0] == docs[1]


def test_exit_17_when_a_ref_needs_work(fresh_checkout, bundle, tmp_path, capsys):
    """A branch past the last release edits the line H1 replaces: the CI gate trips."""
    tree = fresh_checkout("0.19.2", tmp_path / "upstream")
    edit(
        tree / MLA,
        "            submodules.core_attention,\n",
        "            submodules.core_attention,  # x\n",
    )
    culprit = commit_all(tree, "upstream: annotate the core attention spec")
    gitlayer.open_repo(tree).git.branch("next", culprit)
    out = tmp_path / "out"
    code, text = _drift(
        capsys,
        "--megatron",
        str(tree),
        "--tags",
        "core_v0.19.2..next",
        "--out",
        str(out),
        "--no-plot",
    )
    assert code == 17
    doc = json.loads((out / "drift.json").read_text())
    drift.validate(doc)
    ok, nxt = doc["tags"]
    assert ok["verdict"] == "supported" and nxt["verdict"] == "needs_work"
    assert nxt["tag"] == "next" and nxt["version"] == "0.19.2" and nxt["history"] is True
    h1 = next(p for p in nxt["patches"] if p["hook"] == "H1")
    assert h1["class"] == "conflict" and h1["hunks"][0]["culprits"][0]["commit"] == culprit
    assert any(r.startswith("H1 ") for r in nxt["reasons"])
    assert doc["summary"]["needs_work_tags"] == ["next"]


def test_unserved_release_needs_work(combo, bundle, tmp_path, capsys):
    shutil.rmtree(bundle / "patches" / "core_v0.19")
    out = tmp_path / "out"
    code, _ = _drift(
        capsys,
        "--megatron",
        str(combo),
        "--tags",
        "core_v0.19.2..core_v0.19.2",
        "--out",
        str(out),
        "--no-plot",
    )
    assert code == 17
    (entry,) = json.loads((out / "drift.json").read_text())["tags"]
    assert entry["series"] == "core_v0.18" and entry["served"] is False
    assert "no series lists megatron-core 0.19.2" in entry["reasons"][0]
    assert "--onto core_v0.19.2 --from 0.18" in entry["reasons"][0]


def test_bad_ranges(combo, bundle):
    env = {"MLA_SEAM_ROOT": str(bundle)}
    done = run_subprocess(env, "drift", "--megatron", str(combo), "--tags", "0.19")
    assert done.returncode == 2 and "is not FROM..TO" in done.stderr
    done = run_subprocess(env, "drift", "--megatron", str(combo), "--tags", "0.19..nosuchref")
    assert done.returncode == 15 and "unknown tag 'nosuchref'" in done.stderr


def test_committed_report_covers_every_release():
    doc = json.loads((RESULTS / "drift.json").read_text())
    drift.validate(doc)
    assert [e["version"] for e in doc["tags"]] == upstream.RELEASES
    assert doc["summary"]["verdict"] == "supported"
    assert doc["baseline"] == "core_v0.16"
    for name in ("drift.md", "drift.png"):
        assert (RESULTS / name).stat().st_size > 0
