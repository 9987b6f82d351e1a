"""The nightly job (``python -m mla_seam.nightly``, ``ci/nightly.sh``, ``ci/nightly.yml``).

Decisions are checked on literal inputs (the discovery JSON ``mla-seam upstream list --refresh
--json`` prints, report entries); the job runs end to end on real checkouts built from the
PyPI sdists, with a local git remote standing in for GitHub's, and once with a remote that is
not there (the job broke: exit 26, never drift).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import git
import pytest
from mla_seam import drift, gitlayer, nightly
from test_rebase import REPO, bundle  # noqa: F401 (fixture)

DISCOVERY = """[
  {"version": "0.19.2", "tag": "core_v0.19.2", "line": "0.19", "prerelease": false,
   "source": "builtin", "cached": true},
  {"version": "0.20.0rc1", "tag": "core_v0.20.0rc1", "line": "0.20", "prerelease": true,
   "source": "index", "cached": false},
  {"version": "0.20.0", "tag": "core_v0.20.0", "line": "0.20", "prerelease": false,
   "source": "index", "cached": false}
]"""


def test_parse_discovery_sample():
    rows = nightly.parse_discovery(DISCOVERY)
    assert [r["version"] for r in rows] == ["0.19.2", "0.20.0rc1", "0.20.0"]
    assert [r["prerelease"] for r in rows] == [False, True, False]
    for bad in ("not json", '{"version": "0.1"}', '[{"tag": "core_v0.1"}]'):
        with pytest.raises(nightly.JobBroke):
            nightly.parse_discovery(bad)


def _proc(code, out="", err=""):
    return subprocess.CompletedProcess([], code, out, err)


def test_discover_filters_prereleases_and_names_an_unreachable_index():
    calls = []

    def fake(cmd, **kwargs):
        calls.append(cmd)
        return _proc(0, DISCOVERY)

    assert [r["version"] for r in nightly.discover(False, fake)] == ["0.19.2", "0.20.0"]
    assert len(nightly.discover(True, fake)) == 3 and calls[-1][-1] == "--pre"
    assert calls[0][-3:] == ["list", "--refresh", "--json"]
    down = lambda cmd, **kw: _proc(15, err="mla-seam upstream: pypi.org: Name or service unknown")
    with pytest.raises(nightly.JobBroke, match="package index is unreachable.*service unknown"):
        nightly.discover(False, down)


def _entry(tag, version, served, cls, verdict="needs_work", reasons=("x",), gpu=None, hunks=()):
    return {
        "tag": tag,
        "version": version,
        "line": version.rsplit(".", 1)[0],
        "series": "core_v0.19",
        "served": served,
        "verdict": verdict,
        "reasons": list(reasons),
        "gpu": gpu,
        "patches": [{"hook": "H1", "class": c, "hunks": list(hunks)} for c in cls],
    }


def test_plan_sorts_tags_by_who_has_to_act():
    culprit = {"commit": "a" * 40, "subject": "upstream: rewrite MLA init"}
    hunk = {"file": "mla.py", "hunk": "@@ -1 +1 @@", "base_lines": [1, 1], "culprits": [culprit]}
    report = {
        "tags": [
            _entry("core_v0.19.2", "0.19.2", True, ["exact"], verdict="supported", reasons=()),
            _entry("core_v0.20.0", "0.20.0", False, ["offset", "exact"]),
            _entry("core_v0.20.1", "0.20.1", False, ["offset", "conflict"], hunks=[hunk]),
            _entry("core_v0.19.3", "0.19.3", True, ["conflict"]),
            _entry("upstream-main", "0.21.0", False, ["offset"]),
            _entry(
                "core_v0.18.2", "0.18.2", True, ["exact"], reasons=["GPU (h200, overlay_broke): x"],
                gpu={"verdict": "overlay_broke"},
            ),  # fmt: skip
        ]
    }
    new = ["core_v0.20.0", "core_v0.20.1", "upstream-main"]
    todo = {k: [e["tag"] for e in v] for k, v in nightly.plan(report, new).items()}
    assert todo == {
        "propose": ["core_v0.20.0"],
        "human": ["core_v0.20.1", "upstream-main"],
        "overlay": ["core_v0.19.3", "core_v0.18.2"],
    }
    body = nightly.tracking_issue(report, [report["tags"][2]], "# drift.md")
    assert "`aaaaaaaaaaaa` upstream: rewrite MLA init" in body and body.endswith("# drift.md")
    assert nightly.gpu_targets(report, new + ["core_v0.19.3", "core_v0.19.2"]) == [
        "core_v0.19.3",
        "core_v0.20.1",
        "upstream-main",
    ]


def test_exit_code_precedence(tmp_path):
    job = nightly.Job(tmp_path)
    job.report = {"summary": {"needs_work": 1}}
    assert job.exit_code == nightly.EXIT_DRIFT == 17
    job.overlay_broke = ["core_v0.19.2"]
    assert job.exit_code == nightly.EXIT_OVERLAY_BROKE == 25
    job.broke = "remote: unreachable"
    assert job.exit_code == nightly.EXIT_JOB_BROKE == 26
    assert len(set(nightly.EXIT_CODES)) == 4


def test_workflow_copies_are_identical_and_valid():
    ours, github = REPO / "ci" / "nightly.yml", REPO / ".github" / "workflows" / "nightly.yml"
    assert ours.read_bytes() == github.read_bytes()
    text = ours.read_text()
    assert "ci/nightly.sh --phase cpu" in text and "--phase gpu" in text
    assert "vars.MLA_SEAM_GPU_RUNNER == 'true'" in text  # no GPU runner: the CPU report stands
    pytest.importorskip("check_jsonschema")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         str(ours)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture
def clone(fresh_checkout, tmp_path):
    """A clone of an 'upstream' repository (0.19.2, tag and main) through a local remote."""
    upstream_repo = fresh_checkout("0.19.2", tmp_path / "upstream")
    return Path(git.Repo.clone_from(str(upstream_repo), str(tmp_path / "clone")).working_tree_dir)


def _nightly(*args):
    return nightly.main([*args, "--no-discover", "--gpu", "off", "--since", "0.19"])


@pytest.mark.slow
def test_nightly_end_to_end(clone, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    code = _nightly("--out", str(out), "--megatron", str(clone), "--remote", "origin")
    text = capsys.readouterr().out
    outcome = json.loads((out / "outcome.json").read_text())
    assert code == outcome["exit_code"] == 0, text
    assert [s["status"] for s in outcome["steps"]] == ["skipped", "ok", "ok", "ok", "skipped"]
    assert gitlayer.resolve_commit(gitlayer.open_repo(clone), nightly.MAIN_BRANCH)
    doc = json.loads((out / "drift" / "drift.json").read_text())
    drift.validate(doc)
    assert [e["tag"] for e in doc["tags"]] == ["core_v0.19.0", "core_v0.19.2", "upstream-main"]
    assert outcome["gpu_targets"] == ["core_v0.19.2", "upstream-main"]  # first night: all new
    assert "GPU suite not run (--gpu off)" in outcome["notes"][0]
    assert "# mla-seam nightly: nothing to do (exit 0)" in text
    assert len((out / "history.jsonl").read_text().splitlines()) == 1
    # Second night: nothing new, nothing to test on the GPU; the history grows by one line.
    assert _nightly("--out", str(out), "--megatron", str(clone), "--remote", "origin") == 0
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["new_tags"] == [] and outcome["gpu_targets"] == []
    assert len((out / "history.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_new_release_is_proposed_as_a_series(clone, bundle, tmp_path, capsys):
    """0.19.2 with no 0.19 series: every 0.18 hook applies with offsets -> a proposed line."""
    shutil.rmtree(bundle / "patches" / "core_v0.19")
    out = tmp_path / "out"
    code = _nightly("--out", str(out), "--megatron", str(clone))
    outcome = json.loads((out / "outcome.json").read_text())
    assert code == 17, capsys.readouterr().out
    (proposal,) = [p for p in outcome["proposals"] if p["tag"] == "core_v0.19.2"]
    assert proposal["exit"] == 0, proposal
    folder = Path(proposal["folder"])
    assert (folder / "series").is_file() and (folder / "manifest.json").is_file()
    assert "0.19.2" in json.loads((folder / "manifest.json").read_text())["releases"]
    assert "Every hook of core_v0.18 applies to core_v0.19.2" in (folder / "PR.md").read_text()
    assert not (bundle / "patches" / "core_v0.19").exists()  # the bundle itself is untouched
    assert "core_v0.19.2" not in outcome["tracking_issue"]


def test_unreachable_remote_breaks_the_job_not_drift(fresh_checkout, tmp_path, capsys):
    tree = fresh_checkout("0.19.2", tmp_path / "tree")
    gitlayer.open_repo(tree).git.remote("add", "origin", str(tmp_path / "no-such-remote"))
    out = tmp_path / "out"
    code = _nightly("--out", str(out), "--megatron", str(tree), "--remote", "origin")
    text = capsys.readouterr().out
    assert code == nightly.EXIT_JOB_BROKE == 26
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["outcome"] == "the job broke" and "unreachable" in outcome["broke"]
    assert "This is not drift" in text and not (out / "drift").exists()


def test_nightly_script_runs_the_module(tmp_path):
    """ci/nightly.sh is the module behind the venv; a bad option is the job breaking (exit 2)."""
    done = subprocess.run(
        ["bash", str(REPO / "ci" / "nightly.sh"), "--no-such-option"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--no-such-option" in done.stderr


def test_gpu_step_stages_every_tree_then_runs_one_suite_per_device(tmp_path):
    """Staging is serial (releases share the base tree); suites then run side by side.

    No GPU here: each suite process exits 18, and the job says so per target instead of a
    verdict. Branch targets are not staged by the suite.
    """
    results, work = tmp_path / "results", tmp_path / "trees"
    verdicts = nightly.run_gpu(
        ["core_v0.16.1", "core_v0.17.1", "upstream-main"], results, work, None, devices=[0, 1]
    )
    assert sorted(p.name for p in work.iterdir() if p.name != "logs") == [
        "patched-0.16.1", "patched-0.17.1", "vanilla-0.16.1", "vanilla-0.17.1"
    ]  # fmt: skip
    assert verdicts["upstream-main"].startswith("skipped: the suite stages releases")
    for tag in ("core_v0.16.1", "core_v0.17.1"):
        assert verdicts[tag].startswith("no verdict (suite exit 18)"), verdicts[tag]
        assert "CUDA" in verdicts[tag] or "GPU" in verdicts[tag]
    assert len(list((work / "logs").glob("*.log"))) == 2
