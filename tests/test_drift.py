"""``mla-seam drift`` on real checkouts built from PyPI sdists: schema, outputs, exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from mla_seam import drift, gitlayer, upstream
from mla_seam.suite import attribution
from support import (
    MLA,
    REPO,
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


def test_report_validates_and_renders(combo, repo_bundle, tmp_path, capsys):
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
    assert doc["schema_version"] == 2 and doc["run"]["prereleases"] is False
    assert doc["since_previous"] is None and doc["summary"]["gpu_verdicts"] == 0
    entry = doc["tags"][1]
    assert {p["hook"]: p["class"] for p in entry["baseline"]["patches"]}["H6"] == "obsolete"
    assert {p["hook"] for p in entry["patches"]} == {"H1", "H2", "H3", "H4", "H5", "H7", "H8", "H9"}
    assert any(c["probe"] == "mla.qk_norm_resolver" for c in entry["contract_changes"])
    assert doc["lines"]["0.19"]["obsolete"] == ["H6"] and doc["lines"]["0.19"]["line_only"] == [
        "H5",
        "H9",
    ]
    md = (out / "drift.md").read_text()
    assert "| core_v0.19.0 | core_v0.19 |" in md and "## Per release line" in md
    assert md.index("## Since the previous run") < md.index("## Matrix")
    assert "No GPU results attached" in md
    assert "<table" in (out / "drift.html").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "drift-perf.png").exists()  # no GPU results: no performance figure
    assert repo_state(combo) == before


def test_report_is_deterministic(combo, repo_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764000000")
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


def test_exit_17_when_a_ref_needs_work(fresh_checkout, repo_bundle, tmp_path, capsys):
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


def test_unserved_release_needs_work(combo, repo_bundle, tmp_path, capsys):
    shutil.rmtree(repo_bundle / "patches" / "core_v0.19")
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


def test_bad_ranges(combo, repo_bundle):
    env = {"MLA_SEAM_ROOT": str(repo_bundle)}
    done = run_subprocess(env, "drift", "--megatron", str(combo), "--tags", "0.19")
    assert done.returncode == 2 and "is not FROM..TO" in done.stderr
    done = run_subprocess(env, "drift", "--megatron", str(combo), "--tags", "0.19..nosuchref")
    assert done.returncode == 15 and "unknown tag 'nosuchref'" in done.stderr


def test_committed_report_covers_every_release():
    doc = json.loads((RESULTS / "drift.json").read_text())
    drift.validate(doc)
    assert [e["version"] for e in doc["tags"]] == drift.known_releases()
    # The series serves every release as committed: the only reasons a tag may need work are
    # its GPU verdict's (a three-tree run's findings), never a patch, pre-image or contract.
    for entry in doc["tags"]:
        assert all(reason.startswith("GPU (") for reason in entry["reasons"]), entry["reasons"]
        assert entry["served"], entry["tag"]
    assert doc["baseline"] == "core_v0.16"
    for name in ("drift.md", "drift.png"):
        assert (RESULTS / name).stat().st_size > 0


# --- pre-releases, GPU verdicts, history -------------------------------------------------------


@pytest.fixture
def with_rc(fresh_checkout, tmp_path):
    """A 0.19.2 checkout with an ``rc`` tag on its HEAD, as real clones have 15 of them."""
    tree = fresh_checkout("0.19.2", tmp_path / "upstream")
    gitlayer.create_tag(gitlayer.open_repo(tree), "core_v0.19.3rc0")
    return tree


def test_prereleases_are_skipped_unless_asked(with_rc, repo_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--megatron", str(with_rc), "--tags", "0.19.2..main", "--no-plot"]
    code, _ = _drift(capsys, *args, "--out", str(out))
    doc = json.loads((out / "drift.json").read_text())
    assert code == 0 and [e["tag"] for e in doc["tags"]] == ["core_v0.19.2", "main"]
    assert doc["run"]["skipped_prereleases"] == ["core_v0.19.3rc0"]
    assert "pre-releases skipped (1: core_v0.19.3rc0)" in (out / "drift.md").read_text()
    code, _ = _drift(capsys, *args, "--out", str(out), "--pre")
    doc = json.loads((out / "drift.json").read_text())
    assert [e["tag"] for e in doc["tags"]] == ["core_v0.19.2", "core_v0.19.3rc0", "main"]
    assert doc["run"]["prereleases"] is True and doc["run"]["skipped_prereleases"] == []
    assert drift.known_releases(["0.20.0rc1"]) == upstream.RELEASES
    assert drift.known_releases(["0.20.0rc1"], include_pre=True)[-1] == "0.20.0rc1"


def _verdict(tag, version, verdict, findings=()):
    return {
        "schema_version": 1,
        "kind": "mla-seam-gpu-verdict",
        "tag": tag,
        "version": version,
        "timestamp": "2026-11-30T01:00:00+00:00",
        "mla_seam_version": "0.2.0",
        "card": "NVIDIA H200",
        "card_slug": "h200",
        "versions": {"torch": "2.11.0", "cuda": "13.0", "cudnn": 91900,
                     "transformer_engine": "2.20.2", "transformers": "5.0", "python": "3.12"},
        "parallel": {"world_size": 1},
        "trees": {"patched": {"tag": tag, "version": version, "ran": True}},
        "phases": [],
        "tolerances": {"performance": 1.25},
        "counts": {"upstream changed": len(findings), "overlay broke": 0, "absorbed": 0,
                   "unchanged": 0, "unattributed": 0},
        "findings": list(findings),
        "verdict": verdict,
        "reasons": [f["cause"] for f in findings],
    }  # fmt: skip


THD_256 = {
    "category": "performance",
    "subject": "bench_thd_sweep backend=auto rope_fusion=False n_seqs=256 tokens=8192",
    "metric": "ms_median",
    "values": {"vanilla": 229.2, "patched": 240.2, "base": 6.1},
    "attribution": "upstream changed",
    "regressed": True,
    "cause": "THD 256 sequences: vanilla/base 37.57x, patched/base 39.38x",
}


def test_gpu_verdicts_and_history(combo, repo_bundle, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    for tag, version, verdict, findings in (
        ("core_v0.18.2", "0.18.2", "pass", []),
        ("core_v0.19.2", "0.19.2", "upstream_changed", [THD_256]),
    ):
        folder = results / tag / "h200"
        folder.mkdir(parents=True)
        doc = _verdict(tag, version, verdict, findings)
        attribution.validate(doc)
        (folder / "verdict.json").write_text(json.dumps(doc))
        golden = {"lm loss": {"start_step": 1, "end_step": 2, "step_interval": 1,
                              "values": {"1": 4.0, "2": 3.5}}}  # fmt: skip
        (folder / "golden_values_h200_te2.20.2.json").write_text(json.dumps(golden))
    # 0.18.2 also ran on 2 GPUs: one case fails on the patched tree (and alike on vanilla).
    multigpu = results / "core_v0.18.2" / "h200" / "multigpu"
    multigpu.mkdir()
    (multigpu / "results.json").write_text(json.dumps({
        "started": "2026-11-30T02:00:00+00:00", "parallel": {"world_size": 2},
        "cases": [
            {"name": "pp2-vpp2-first2/gpt/te", "patched": {"ok": True, "outcome": "ran"},
             "vanilla": {"ok": True, "outcome": "ran"}},
            {"name": "tp2-sp/layer/te",
             "patched": {"ok": False, "outcome": "ran", "failed_checks": ["grads<=0.005"]},
             "vanilla": {"ok": False, "outcome": "ran", "failed_checks": ["grads<=0.005"]}},
        ]}))  # fmt: skip
    history_file = tmp_path / "history.jsonl"
    args = ["--megatron", str(combo), "--tags", "0.18.2..0.19.2", "--history", str(history_file)]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764000000")
    code, _ = _drift(capsys, *args, "--out", str(tmp_path / "first"), "--no-plot")
    assert code == 0
    first = json.loads((tmp_path / "first" / "drift.json").read_text())
    assert first["since_previous"] is None and len(history_file.read_text().splitlines()) == 1

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764086400")
    out = tmp_path / "second"
    code, text = _drift(capsys, *args, "--gpu-results", str(results), "--out", str(out))
    assert code == 17  # the GPU verdict of 0.19.2 says upstream changed and patched regressed
    doc = json.loads((out / "drift.json").read_text())
    drift.validate(doc)
    by_tag = {e["tag"]: e for e in doc["tags"]}
    assert by_tag["core_v0.18.2"]["gpu"]["verdict"] == "pass"
    # ... and a multi-GPU case fails on its patched tree: summarized, but judged only by the
    # folder's verdict.json (the suite's attribution), which predates that run: stale, said so.
    slot = by_tag["core_v0.18.2"]["gpu"]
    assert slot["multigpu"]["failed"][0]["case"] == "tp2-sp/layer/te"
    assert by_tag["core_v0.18.2"]["verdict"] == "supported"
    assert "derived without the multi-GPU run beside it" in slot["stale"]
    assert "--reattribute" in slot["stale"] and "stale" not in by_tag["core_v0.19.2"]["gpu"]
    assert by_tag["core_v0.19.0"]["gpu"] is None
    hit = by_tag["core_v0.19.2"]
    assert (
        hit["verdict"] == "needs_work" and hit["gpu"]["moved"][0]["subject"] == THD_256["subject"]
    )
    assert any(r.startswith("GPU (h200, upstream_changed)") for r in hit["reasons"])
    assert hit["gpu"]["golden"] == {"patched": {"lm loss": [4.0, 3.5]}}
    assert doc["run"]["cards"] == ["NVIDIA H200"] and doc["summary"]["gpu_verdicts"] == 2
    since = doc["since_previous"]
    assert since["previous_timestamp"] == first["run"]["timestamp"]
    assert {"tag": "core_v0.19.2", "changes": ["verdict supported -> needs_work",
            "GPU verdict None -> upstream_changed"]} in since["changed"]  # fmt: skip
    md = (out / "drift.md").read_text()
    assert md.index("## Since the previous run") < md.index("## Matrix")
    assert "upstream_changed (h200)" in md and "## Trend (history file)" in md
    assert "| pass (h200); 2 GPUs 1/2 (stale verdict.json: re-derive it with --reattribute) |" in md
    assert len(history_file.read_text().splitlines()) == 2
    pytest.importorskip("matplotlib")
    for name in ("drift.png", "drift-perf.png", "drift-golden.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def _row(tag: str, version: str) -> dict:
    """A swept ``tags[]`` entry, every hook exact (for the GPU slot and the rendering)."""
    return {
        "tag": tag, "version": version, "line": version[:4], "commit": "c" * 40,
        "source": "git", "series": "core_v0.19", "served": True, "history": True,
        "patches": [{"hook": "H1", "class": "exact"}], "contracts": {}, "contract_changes": [],
        "verdict": "supported", "reasons": [], "baseline": None, "gpu": None,
    }  # fmt: skip


def test_main_and_dev_rows_take_their_own_gpu_verdicts_or_say_there_is_none(tmp_path):
    """The nightly's rows of followed branches (upstream-main, upstream-dev) take the verdicts
    filed under the moving target's name only (dev says 0.19.0: that release's is not dev's);
    without one the row says so, never pass."""
    from mla_seam.drift import gpu as drift_gpu
    from mla_seam.drift.render import NO_GPU_VERDICT

    results = tmp_path / "results"
    for folder, tag, version in (("main", "main", "0.20.0"), ("core_v0.19.0", "core_v0.19.0",
                                                             "0.19.0")):  # fmt: skip
        (results / folder / "h200").mkdir(parents=True)
        doc = _verdict(tag, version, "pass")
        attribution.validate(doc)
        (results / folder / "h200" / "verdict.json").write_text(json.dumps(doc))
    rows = [("core_v0.19.2", "0.19.2"), ("upstream-main", "0.20.0"), ("upstream-dev", "0.19.0")]
    doc = drift.report("0.19.2..upstream-main", [_row(t, v) for t, v in rows])
    assert drift_gpu.attach(doc, results) == 1
    by_tag = {e["tag"]: e for e in doc["tags"]}
    assert by_tag["upstream-main"]["gpu"]["results"] == "main/h200"
    assert by_tag["upstream-dev"]["gpu"] is None and by_tag["core_v0.19.2"]["gpu"] is None
    md = drift.markdown(doc)
    table = md.split("## Matrix", 1)[1].split("\n## ", 1)[0]
    matrix = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines() if ln.startswith("| ")}
    assert matrix["upstream-main"].endswith("| 0 | pass (h200) | supported |")
    assert matrix["upstream-dev"].endswith(f"| 0 | {NO_GPU_VERDICT} | supported |")
    assert matrix["core_v0.19.2"].endswith("| 0 | - | supported |")  # a tag: no results, "-"
    gpu_section = md.split("## GPU verdicts", 1)[1]
    assert f"- upstream-dev: {NO_GPU_VERDICT} (the suite files it as <DIR>/dev/" in gpu_section
    assert "| upstream-main | NVIDIA H200 | pass |" in gpu_section
    assert "- upstream-main:" not in gpu_section
    assert NO_GPU_VERDICT in drift.html_table(doc)


def test_bad_gpu_results_folder(combo, repo_bundle, tmp_path):
    env = {"MLA_SEAM_ROOT": str(repo_bundle)}
    done = run_subprocess(
        env, "drift", "--megatron", str(combo), "--tags", "0.19.2..0.19.2",
        "--gpu-results", str(tmp_path / "none"),
    )  # fmt: skip
    assert done.returncode == 2 and "is not a folder" in done.stderr


def test_bad_baseline_names_its_own_option(combo, repo_bundle):
    done = run_subprocess(
        {"MLA_SEAM_ROOT": str(repo_bundle)}, "drift", "--megatron", str(combo), "--tags",
        "0.19.2..0.19.2", "--baseline", "0.99",
    )  # fmt: skip
    assert done.returncode == 2 and "--baseline 0.99: no such release line" in done.stderr
    assert "--series" not in done.stderr and "Traceback" not in done.stderr


def test_history_lines_that_are_not_records_are_skipped_with_a_message(tmp_path, caplog):
    """A JSON list, a truncated line, a record of another version: skipped, each said why."""
    from mla_seam.drift import history

    good = {"history_version": 1, "timestamp": "2026-12-01T00:00:00+00:00", "tags": {},
            "summary": {"tags": 0}}  # fmt: skip
    path = tmp_path / "history.jsonl"
    path.write_text(
        "\n".join([json.dumps(good), "[1, 2]", '{"history_version": 1, "tim', json.dumps(
            dict(good, history_version=9)), json.dumps(dict(good, tags={"t": {"classes": []}}))])
        + "\n"
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        entries = history.load(path)
    assert entries == [good]
    assert "line 2 is a JSON list, not a history record" in caplog.text
    assert "line 3 is not JSON" in caplog.text and "line 4 is history_version 9" in caplog.text
    assert "line 5 is a tag record whose classes are not an object" in caplog.text
    doc = {"run": {"timestamp": "2026-12-02T00:00:00+00:00"}, "tool": "t", "range": "a..b",
           "summary": {"tags": 0, "supported": 0, "needs_work": 0}, "tags": []}  # fmt: skip
    assert history.since(doc, entries[-1])["new_tags"] == []
    path.write_text("[1, 2]\n")  # a list as the last line: appending does not crash either
    history.append(path, doc)
    assert [json.loads(line) for line in path.read_text().splitlines()][0] == [1, 2]
    assert len(history.load(path)) == 1


def test_sweep_cache_reuses_unchanged_tags(combo, repo_bundle, tmp_path, monkeypatch, caplog):
    """The nightly's per-tag cache: a second sweep surveys nothing and reports the same;
    a changed series is a new key (surveyed again)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764000000")
    cache = tmp_path / "sweeps"
    first = drift.build(combo, "0.18.2..0.19.2", baseline="0.16", sweep_cache=cache)
    assert len(list(cache.glob("*.json"))) == 3
    with caplog.at_level("INFO"):
        again = drift.build(combo, "0.18.2..0.19.2", baseline="0.16", sweep_cache=cache)
    assert caplog.text.count("(unchanged: cached)") == 3
    assert again == first and again["tags"][1]["contract_changes"]  # recomputed from the cache
    patch = next((repo_bundle / "patches" / "core_v0.19").glob("*H9*.patch"))
    manifest = repo_bundle / "patches" / "core_v0.19" / "manifest.json"
    patch.write_bytes(patch.read_bytes().replace(b"Why:", b"Why: (edited)", 1))
    data = json.loads(manifest.read_text())
    for item in data["patches"]:
        if item["name"] == patch.name:
            item["sha256"] = hashlib.sha256(patch.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    caplog.clear()
    with caplog.at_level("INFO"):
        drift.build(combo, "0.18.2..0.19.2", baseline="0.16", sweep_cache=cache)
    assert "(unchanged: cached)" not in caplog.text and len(list(cache.glob("*.json"))) == 6
