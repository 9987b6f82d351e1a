"""The nightly job (``python -m mla_seam.nightly``, ``ci/nightly.sh``, ``ci/nightly.yml``).

Decisions are checked on literal inputs (the discovery JSON, drift report entries); the job
runs end to end with real git and no GitHub: a local bare "upstream" (``test_partial_clones``:
a new release tag moving three hooks, one offset, one clean 3-way, one conflict, ``main`` after
it, and a ``dev`` branch that conflicts), a blobless clone of it, and a local bare "origin" of
this project. Night one pushes main's proposal branch (an update of ``patches/main/``, main's own
series), writes the pull-request and issue texts (the new tag and dev need a human), records the
GitHub calls (the one thin layer, in dry-run mode) and stages the proposed series for the GPU
step (dry run on the CPU); night two, with nothing new upstream, changes nothing and calls
GitHub not once. Another test moves main after its proposal is merged: ok while the rebase
writes the checked-in series (a new release tag beside it still gets its own line), a proposal
once a hooked file moves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mla_seam import gitlayer, nightly, paths
from mla_seam.nightly import cpu, github, publish, state, targets, texts
from mla_seam.suite.trees import applied_line
from support import REBASE_DATE as DATE
from support import REPO
from synthetic_upstream import LM, SPARSE

DISCOVERY = """[
  {"version": "0.19.2", "tag": "core_v0.19.2", "line": "0.19", "prerelease": false,
   "source": "builtin", "cached": true},
  {"version": "0.20.0rc1", "tag": "core_v0.20.0rc1", "line": "0.20", "prerelease": true,
   "source": "index", "cached": false},
  {"version": "0.20.0", "tag": "core_v0.20.0", "line": "0.20", "prerelease": false,
   "source": "index", "cached": false},
  {"version": "0.21.0rc1", "tag": "core_v0.21.0rc1", "line": "0.21", "prerelease": true,
   "source": "index", "cached": false},
  {"version": "0.19.1", "tag": "core_v0.19.1", "line": "0.19", "prerelease": false,
   "source": "index", "cached": false, "yanked": true}
]"""


def test_parse_discovery_sample():
    rows = nightly.parse_discovery(DISCOVERY)
    assert [r["version"] for r in rows][:4] == ["0.19.2", "0.20.0rc1", "0.20.0", "0.21.0rc1"]
    assert [r["prerelease"] for r in rows] == [False, True, False, True, False]
    for bad in ("not json", '{"version": "0.1"}', '[{"tag": "core_v0.1"}]'):
        with pytest.raises(nightly.JobBroke):
            nightly.parse_discovery(bad)


def _proc(code, out="", err=""):
    return subprocess.CompletedProcess([], code, out, err)


def test_discover_keeps_only_upcoming_prereleases_and_names_an_unreachable_index():
    calls = []
    devs = [
        {"version": f"0.22.0.dev{k}", "tag": "", "line": "0.22", "prerelease": True}
        for k in range(40)
    ]
    sample = json.loads(DISCOVERY) + devs

    def fake(cmd, **kwargs):
        calls.append(cmd)
        return _proc(0, json.dumps(sample))

    assert [r["version"] for r in nightly.discover(False, fake)] == ["0.19.2", "0.20.0"]
    with_pre = [r["version"] for r in nightly.discover(True, fake)]
    # 0.20.0rc1 is older than the 0.20.0 release; of the 41 upcoming ones the newest 3 are kept;
    # the yanked 0.19.1 never (it would become a "new release" to propose)
    assert with_pre == ["0.19.2", "0.20.0", "0.22.0.dev37", "0.22.0.dev38", "0.22.0.dev39"]
    assert calls[-1][-1] == "--pre" and calls[0][-3:] == ["list", "--refresh", "--json"]
    down = lambda cmd, **kw: _proc(15, err="mla-seam upstream: pypi.org: Name or service unknown")
    with pytest.raises(nightly.JobBroke, match="package index is unreachable.*service unknown"):
        nightly.discover(False, down)


def _entry(tag, version, cls, verdict="needs_work", reasons=("x",), served=False, contracts=None):
    return {
        "tag": tag,
        "version": version,
        "line": ".".join(version.split(".")[:2]),
        "commit": "c" * 40,
        "series": "core_v0.19",
        "served": served,
        "verdict": verdict,
        "reasons": list(reasons),
        "contracts": contracts,
        "patches": [{"hook": f"H{k}", "class": c, "hunks": []} for k, c in enumerate(cls, 1)],
    }


def test_targets_and_what_each_needs(megatron_checkout):
    from mla_seam import contracts
    from mla_seam.survey import load_lines

    lines = load_lines(REPO / "patches")
    dev_made_from = next(s for s in lines if s.name == "dev").upstream["commit"]
    probes = contracts.probe_tree(contracts.DirSource(megatron_checkout("0.19.2")))
    report = {
        "tags": [
            _entry("core_v0.19.2", "0.19.2", ["exact"], "supported", (), served=True),
            _entry("core_v0.19.0", "0.19.1", ["exact"], "supported", (), served=True),
            _entry("core_v0.20.0", "0.20.0", ["offset", "three_way"]),
            _entry("core_v0.20.1", "0.20.1", ["offset", "conflict"]),
            _entry("core_v0.19.2rc1", "0.19.2rc1", ["conflict"]),
            _entry("core_v0.18.2", "0.18.2", ["conflict"], served=True, reasons=["H1 broke"]),
            _entry("upstream-main", "0.21.0", ["offset", "three_way"]),
            _entry("upstream-dev", "0.19.0", ["three_way"]),
            _entry("upstream-feature", "0.19.0", ["three_way"]),
            _entry("upstream-stale", "0.22.0", ["exact"]),  # not followed tonight
        ]
    }
    for entry in report["tags"]:
        entry["contracts"] = probes  # what the adapter handles (no contract problem)
    follow = ["main", "dev", "feature"]
    found = {t.name: t for t in nightly.moving_targets(report, follow, lines)}
    assert list(found) == [
        "core_v0.20.0", "core_v0.20.1", "core_v0.18.2", "main", "dev", "feature"
    ]  # fmt: skip
    entries = {e["tag"]: e for e in report["tags"]}
    actions = {n: nightly.plan(t, entries[t.ref], lines).action for n, t in found.items()}
    assert actions == {
        "core_v0.20.1": "human",
        "core_v0.20.0": "propose",
        "core_v0.18.2": "human",  # the overlay broke on a release the series lists
        "main": "propose",  # its own series, patches/main, whatever its version says
        "dev": "propose",  # says 0.19.0, but patches/dev is written, never core_v0.19
        "feature": "human",  # no series of its own, and 0.19's series serves releases
    }
    assert found["core_v0.18.2"].kind == "overlay"
    assert {n: t.folder for n, t in found.items() if t.action == "propose"} == {
        "core_v0.20.0": "core_v0.20", "main": "main", "dev": "dev"
    }  # fmt: skip
    assert "core_v0.19 series" in found["feature"].reasons[0]
    assert "no moving target" in found["feature"].reasons[0]
    assert found["main"].branch == "mla-seam/propose/main"

    # dev at the commit patches/dev was made from, surveyed with it: nothing to port.
    at_snapshot = dict(_entry("upstream-dev", "0.19.0", ["exact"], "supported", ()))
    at_snapshot.update(commit=dev_made_from, series="dev", served=True, contracts=probes)
    (dev,) = nightly.moving_targets({"tags": [at_snapshot]}, ["dev"], lines)
    assert nightly.plan(dev, at_snapshot, lines).action == "ok"
    # ... a conflict on it still goes to a human, with the port's commands for dev.
    conflict = dict(
        at_snapshot,
        commit="d" * 40,
        patches=[{"hook": "H1", "class": "conflict", "name": "0001-H1.patch"}],
    )
    (dev,) = nightly.moving_targets({"tags": [conflict]}, ["dev"], lines)
    assert nightly.plan(dev, conflict, lines).action == "human"
    assert "--onto dev --from dev --keep" in texts.port_commands(dev, conflict["patches"])


def test_a_proposal_digest_ignores_the_snapshot_commit_only():
    manifest = {
        "releases": ["main@d98e8a64dd"],
        "upstream": {"commit": "d98e8a64dd" + "0" * 30},
        "files": {"a.py": [{"pre": "1", "post": "2", "releases": ["main@d98e8a64dd"]}]},
    }
    moved = json.loads(json.dumps(manifest).replace("d98e8a64dd", "0123456789"))
    patch = {"0001-H1.patch": b"diff\n"}
    first = targets.proposal_digest({**patch, "manifest.json": json.dumps(manifest).encode()})
    assert first == targets.proposal_digest({**patch, "manifest.json": json.dumps(moved).encode()})
    moved["files"]["a.py"][0]["pre"] = "3"  # a hooked file moved: a new proposal
    assert first != targets.proposal_digest({**patch, "manifest.json": json.dumps(moved).encode()})
    other = {"0001-H1.patch": b"diff 2\n", "manifest.json": json.dumps(manifest).encode()}
    assert first != targets.proposal_digest(other)


def test_exit_code_precedence(tmp_path):
    job = nightly.Job(tmp_path)
    job.report = {"summary": {"needs_work": 1}}
    assert job.exit_code == nightly.EXIT_DRIFT == 17
    job.overlay_broke = ["core_v0.19.2"]
    assert job.exit_code == nightly.EXIT_OVERLAY_BROKE == 25
    job.broke = "remote: unreachable"
    assert job.exit_code == nightly.EXIT_JOB_BROKE == 26
    assert len(set(nightly.EXIT_CODES)) == 4
    publishing = nightly.Job(tmp_path, phase="publish", targets=[{"action": "propose"}])
    assert publishing.exit_code == 0  # drift is the CPU phase's verdict, not publishing's


def test_bodies_stay_under_githubs_limit():
    huge = "x" * 50_000 + "\n" + "y" * 200_000
    body = texts.capped(
        [("", "intro"), ("Report", huge), ("Tail", "end")], "proposals/m/PR-full.md"
    )
    assert len(body) < texts.BODY_LIMIT and body.startswith("intro")
    assert "## Tail" in body and "PR-full.md" in body and "mla-seam-drift" in body


# --- the workflow ---------------------------------------------------------------------------------


WORKFLOW = REPO / "ci" / "nightly.yml"


def _run_scripts(text: str) -> list:
    """The ``run:`` scripts of a workflow (a block scalar, or one line)."""
    scripts, lines = [], text.splitlines()
    for k, line in enumerate(lines):
        match = re.match(r"^(\s*)(?:- )?run: ?(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2)
        if rest.strip() not in ("|", ">"):
            scripts.append(rest)
            continue
        body = []
        for follow in lines[k + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            body.append(follow)
        scripts.append("\n".join(body))
    return scripts


def test_workflow_copies_are_identical_and_valid():
    ours, github_copy = WORKFLOW, REPO / ".github" / "workflows" / "nightly.yml"
    assert ours.read_bytes() == github_copy.read_bytes()
    text = ours.read_text()
    for phase in ("cpu", "publish", "gpu", "report"):
        assert f"--phase {phase}" in text
    assert "vars.MLA_SEAM_GPU_RUNNER == 'true'" in text  # no GPU runner: the CPU report stands
    uses = re.findall(r"uses: (\S+)", text)
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", u) for u in uses), uses
    assert re.search(r"^permissions:\n  contents: read\n", text, re.M)  # read-only by default
    gpu_job = text.split("\n  gpu:\n", 1)[1].split("\n  report:\n", 1)[0]
    assert "permissions:\n      contents: read\n" in gpu_job and "write" not in gpu_job
    for script in _run_scripts(text):  # no expression expanded inside a shell script
        assert "${{" not in script, script
    pytest.importorskip("check_jsonschema")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         str(ours)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflow_has_no_high_zizmor_finding():
    zizmor = shutil.which("zizmor") or str(Path(sys.executable).parent / "zizmor")
    if not Path(zizmor).is_file():
        pytest.skip("zizmor is not installed (.ci/run installs it from PyPI and runs it)")
    done = subprocess.run(
        [zizmor, "--offline", "--min-severity", "high", "--format", "plain", str(WORKFLOW)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_nightly_script_runs_the_module(tmp_path):
    """ci/nightly.sh is the module behind the venv; a bad option is the job breaking (exit 2)."""
    done = subprocess.run(
        ["bash", str(REPO / "ci" / "nightly.sh"), "--no-such-option"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--no-such-option" in done.stderr


# --- publishing: the project's own remote and the GitHub layer ----------------------------------


@pytest.fixture
def project(tmp_path):
    """A bare "origin" of this project (main: patches/ and overlay/) and a checkout of it."""
    work = tmp_path / "project-work"
    for name in ("patches", "overlay"):
        shutil.copytree(REPO / name, work / name)
    (work / "README.md").write_text("mla-seam\n")
    repo = gitlayer.init_repo(work)
    gitlayer.commit_all(repo, "project", DATE)
    origin = tmp_path / "origin.git"
    gitlayer.init_bare(origin)
    repo.git.push("--quiet", str(origin), "main:refs/heads/main")
    gitlayer.clone(origin.as_uri(), tmp_path / "project")
    return tmp_path / "project"


def _refs(project_dir: Path) -> dict:
    repo = gitlayer.open_repo(project_dir)
    return gitlayer.ls_remote(repo, "origin", ["refs/heads/*"])


def _proposal_target(out: Path, name: str, content: str) -> targets.Target:
    """A proposal folder with one line folder (what the CPU phase writes), for the publisher."""
    target = targets.Target(name, "branch", f"upstream-{name}", "f" * 40, "0.21.0", "0.21",
                            "core_v0.19", action="propose")  # fmt: skip
    folder = out / "proposals" / target.slug
    line = folder / "bundle" / "patches" / "core_v0.21"
    shutil.rmtree(folder, ignore_errors=True)
    line.mkdir(parents=True)
    (line / "series").write_text(content)
    (folder / "PR.md").write_text("body\n")
    files = {"series": content.encode()}
    target.proposal = {
        "ok": True, "folder": f"proposals/{target.slug}", "line_dir": "core_v0.21",
        "fingerprint": targets.proposal_digest(files), "title": "mla-seam: serve main",
    }  # fmt: skip
    return target


def test_publisher_never_pushes_over_someone_elses_commits(project, tmp_path):
    out, data = tmp_path / "out", state.empty()
    gh = github.GitHub("acme/mla-seam", dry_run=True)
    repo = gitlayer.open_repo(project)
    pub = publish.Publisher(out, data, gh, repo, "origin", "main", token_kind="github-token")
    target = _proposal_target(out, "main", "one\n")
    pub.proposal(target)
    first = _refs(project)["refs/heads/mla-seam/propose/main"]
    assert [c["argv"][3:5] for c in gh.calls] == [["GET", "repos/acme/mla-seam/pulls?state=open&head=acme:mla-seam/propose/main"], ["POST", "repos/acme/mla-seam/pulls"]]  # fmt: skip
    assert "opened with github.token" in pub.warnings[0]  # CI will not run on it: said so
    pub.proposal(target)  # unchanged: nothing pushed, no call
    assert len(gh.calls) == 2 and _refs(project)["refs/heads/mla-seam/propose/main"] == first
    # A reviewer pushes a fixup on the branch; then upstream moves and the proposal changes.
    other = gitlayer.commit_files(repo, first, {"fixup.txt": b"mine\n"}, "reviewer fixup\n",
                                  ("Reviewer", "r@example.com"), DATE)  # fmt: skip
    assert gitlayer.push_ref(repo, "origin", other, "refs/heads/mla-seam/propose/main")[0]
    pub.proposal(_proposal_target(out, "main", "two\n"))
    assert _refs(project)["refs/heads/mla-seam/propose/main"] == other  # never pushed over
    assert gh.calls[-1]["argv"][3:5] == ["POST", "repos/acme/mla-seam/issues/1/comments"]
    assert "never pushes over other people's commits" in gh.calls[-1]["payload"]["body"]
    calls = len(gh.calls)
    pub.proposal(_proposal_target(out, "main", "two\n"))  # said once, not every night
    assert len(gh.calls) == calls


def test_tracking_issue_changes_notify_and_resolved_ones_close(project, tmp_path):
    out, data = tmp_path / "out", state.empty()
    gh = github.GitHub("acme/mla-seam", dry_run=True)
    pub = publish.Publisher(out, data, gh, gitlayer.open_repo(project), "origin", "main")
    target = targets.Target("dev", "branch", "upstream-dev", "d" * 40, "0.19.0", "0.19",
                            "core_v0.19", action="human", classes={"H1": "conflict"},
                            reasons=["H1 conflict"])  # fmt: skip
    (out / "issues").mkdir(parents=True)
    (out / "issues" / "dev.md").write_text("issue body\n")
    target.issue = {"title": "t", "file": "issues/dev.md", "fingerprint": "a"}
    pub.issue(target)
    assert [c["argv"][3:5] for c in gh.calls][-1] == ["POST", "repos/acme/mla-seam/issues"]
    number = data["targets"]["dev"]["issue"]["number"]
    pub.issue(target)  # nothing new: no edit, no comment
    calls = len(gh.calls)
    target.issue["fingerprint"], target.classes = "b", {"H1": "conflict", "H4": "conflict"}
    pub.issue(target)
    new = [c["argv"][3:5] for c in gh.calls[calls:]]
    assert ["PATCH", f"repos/acme/mla-seam/issues/{number}"] in new
    comment = gh.calls[-1]
    assert comment["argv"][3:5] == ["POST", f"repos/acme/mla-seam/issues/{number}/comments"]
    assert "H4: - -> conflict" in comment["payload"]["body"]  # an edit alone notifies nobody
    target.action = "ok"
    pub.close_resolved({"dev": target})
    assert gh.calls[-1]["payload"] == {"state": "closed", "state_reason": "completed"}
    assert data["targets"]["dev"]["issue"]["open"] is False


def test_gpu_runs_only_when_what_the_series_reads_changed(tmp_path):
    work = tmp_path / "m"
    (work / "megatron" / "core" / "transformer").mkdir(parents=True)
    mla = work / "megatron/core/transformer/multi_latent_attention.py"
    mla.write_text("x = 1\n")
    (work / "README.md").write_text("a\n")
    repo = gitlayer.init_repo(work)
    first = gitlayer.commit_all(repo, "one", DATE)
    (work / "README.md").write_text("b\n")
    readme = gitlayer.commit_all(repo, "readme", DATE)
    mla.write_text("x = 2\n")
    hooked = gitlayer.commit_all(repo, "mla", DATE)
    target = targets.Target(
        "main", "branch", "upstream-main", first, "0.21.0", "0.21", "core_v0.19"
    )
    prints = []
    for commit in (first, readme, hooked):
        target.commit = commit
        prints.append(cpu.gpu_fingerprint(work, target, "series"))
    assert prints[0] == prints[1] != prints[2]
    data = {"targets": {"main": {"gpu": {"fingerprint": prints[2], "verdict": "pass"}}}}
    target.action, target.proposal = "propose", {"fingerprint": "series"}
    assert cpu.plan_gpu(target, work, data)["run"] is False
    assert cpu.plan_gpu(target, work, state.empty())["run"] is True


# --- end to end: two nights -------------------------------------------------------------------------


def _night(tmp_path, name, clone, project, follow="main,dev"):
    out = tmp_path / name
    common = [
        "--out", str(out), "--megatron", str(clone), "--remote", "origin", "--since", "0.19.2",
        "--no-discover", "--no-plot", "--follow", follow, "--project", str(project),
        "--github", "acme/mla-seam", "--github-dry-run", "--base-branch", "main",
    ]  # fmt: skip
    codes = {
        "cpu": nightly.main(["--phase", "cpu", "--state-branch", *common]),
        "publish": nightly.main(["--phase", "publish", "--push-state", *common]),
        "gpu": nightly.main(["--phase", "gpu", "--gpu", "dry-run", *common]),
        "report": nightly.main(["--phase", "report", "--state-branch", "--push-state", *common]),
    }
    return out, codes


def _calls(out: Path) -> list:
    path = out / "github-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_two_nights_end_to_end(upstream_remote, project, repo_bundle, tmp_path, capsys):
    clone = tmp_path / "megatron"
    gitlayer.clone(upstream_remote.url, clone, filter_spec="blob:none", sparse=SPARSE)
    repo = gitlayer.open_repo(clone)
    gitlayer.fetch_upstream(repo, "origin", {}, unshallow=False)  # as the workflow's clone step

    out, codes = _night(tmp_path, "night1", clone, project)
    text = capsys.readouterr().out
    assert codes == {"cpu": 17, "publish": 0, "gpu": 0, "report": 0}, text
    plan = {t["name"]: t for t in json.loads((out / "targets.json").read_text())["targets"]}
    assert {n: t["action"] for n, t in plan.items()} == {
        "core_v0.20.0": "human", "main": "propose", "dev": "human"
    }  # fmt: skip

    # main: every hook carries (H3 merged 3-way, recorded in its header); its own series,
    # patches/main/, is written (main says 0.21.0: never patches/core_v0.21/), with the
    # snapshot of the commit it was made from, and pushed to origin.
    main = plan["main"]
    assert main["classes"]["H3"] == "three_way" and main["classes"]["H4"] == "offset"
    assert main["proposal"]["line_dir"] == "main"
    proposed = out / main["proposal"]["folder"] / "bundle" / "patches"
    line = proposed / "main"
    assert not (proposed / "core_v0.21").exists() and not (proposed / "core_v0.20").exists()
    manifest = json.loads((line / "manifest.json").read_text())
    snapshot = f"main@{upstream_remote.commits['main'][:10]}"
    assert manifest["releases"] == [snapshot] and manifest["line"] == "main"
    assert manifest["upstream"]["commit"] == upstream_remote.commits["main"]
    h3 = next(line.glob("*-H3-*")).read_text()
    assert "Merged-3way: 3-way onto upstream-main" in h3 and "Last-Update: 2026-12-01" in h3
    refs = _refs(project)
    head = refs["refs/heads/mla-seam/propose/main"]
    prepo = gitlayer.open_repo(project)
    for name in ("series", "manifest.json"):
        assert (
            gitlayer.read_file_at(prepo, head, f"patches/main/{name}") == (line / name).read_bytes()
        )
    assert gitlayer.files_under(prepo, head, "patches/core_v0.21") == []
    message = gitlayer.commit_author(prepo, head)[1]
    assert "Mla-Seam-Proposal:" in message and "with patches/main/" in message
    assert (
        gitlayer.read_file_at(prepo, refs["refs/heads/main"], "patches/main/manifest.json")
        != (line / "manifest.json").read_bytes()
    )  # the default branch keeps its own main series until the PR is merged
    pr_body = (out / main["proposal"]["folder"] / "PR.md").read_text()
    assert "wrote `patches/main/`" in pr_body and f"`{snapshot}`" in pr_body

    # dev: its own series exists, but H7 conflicts on it: a tracking issue for dev, with the
    # hunk, the one culprit and the port's commands (onto dev: patches/dev is what they write).
    dev_issue = (out / "issues" / "dev.md").read_text()
    assert "transformer_layer.py" in dev_issue
    hunks = dev_issue.split("## Hunks", 1)[1].split("\n## ", 1)[0]
    assert "transformer_layer.py" in hunks and hunks.count(upstream_remote.commits["dev"][:12]) == 1
    assert "mla-seam rebase --megatron CLONE --onto dev --from 0.19 --keep" in dev_issue
    # the drift report carries main and dev as rows, with no GPU verdict yet (none committed)
    md = (out / "drift" / "drift.md").read_text()
    for row in ("upstream-main", "upstream-dev"):
        assert re.search(rf"^\| {row} \|.*\| no GPU verdict yet \| needs_work \|$", md, re.M), md

    # core_v0.20.0: the conflict needs a human; the issue names the hunk, culprit and command.
    issue = (out / "issues" / "core_v0.20.0.md").read_text()
    assert "transformer_layer.py" in issue and upstream_remote.commits["conflict"][:12] in issue
    assert "mla-seam rebase --megatron CLONE --onto core_v0.20.0 --from 0.19 --keep" in issue
    assert issue.count(upstream_remote.commits["conflict"][:12]) == 1  # the culprit named once

    calls = _calls(out)
    posts = [
        (c["argv"][4].rsplit("/", 1)[-1], c["payload"]) for c in calls if c["argv"][3] == "POST"
    ]
    assert [p[0] for p in posts] == ["labels", "issues", "pulls", "issues"]  # the report's order
    assert "core_v0.20.0" in posts[1][1]["title"] and posts[1][1]["labels"] == ["mla-seam-drift"]
    assert posts[2][1]["head"] == "mla-seam/propose/main" and posts[2][1]["base"] == "main"
    assert "patches/main" in posts[2][1]["title"]
    assert posts[3][1]["title"] == "mla-seam: upstream dev needs a hand-made port"
    assert all(len(p[1].get("body", "")) < texts.BODY_LIMIT for p in posts)

    # The GPU step stages the proposed series on main (dry run: no GPU here).
    verdicts = json.loads((out / "gpu" / "verdicts.json").read_text())
    assert list(verdicts) == ["main"] and verdicts["main"]["verdict"] == "staged"
    assert verdicts["main"]["series"] == "proposal"
    patched = Path(verdicts["main"]["trees"]["patched"])
    assert (patched / paths.ADAPTER_RELPATH).is_file()
    assert gitlayer.head_commit(gitlayer.open_repo(patched)) == upstream_remote.commits["main"]
    assert applied_line(patched) == "main"  # the proposal's patches/main, filed as main
    saved = json.loads(
        gitlayer.read_file_at(prepo, _refs(project)["refs/heads/" + state.BRANCH], "state.json")
    )
    assert saved["targets"]["main"]["proposal"]["pr"] == 2  # issues and pulls share numbers
    assert saved["targets"]["main"]["gpu"]["verdict"] == "staged"
    assert saved["targets"]["core_v0.20.0"]["issue"] == dict(
        saved["targets"]["core_v0.20.0"]["issue"], number=1, open=True
    )
    before = _refs(project)

    # Night two: nothing new upstream. Nothing is pushed, nobody is notified.
    out2, codes = _night(tmp_path, "night2", clone, project)
    text = capsys.readouterr().out
    assert codes == {"cpu": 17, "publish": 0, "gpu": 0, "report": 0}, text
    assert _calls(out2) == []
    assert _refs(project) == before
    outcome = json.loads((out2 / "outcome.json").read_text())
    assert outcome["gpu_targets"] == []
    steps = {s["name"]: s for s in outcome["steps"]}
    assert "nothing changed since the last recorded night" in steps["drift"]["note"]


def test_gpu_suites_without_a_gpu_say_so_per_target(tmp_path):
    """Staged trees, one suite process per target over the devices: here no GPU, so each
    target's record says the suite exited 18, instead of a verdict."""
    from mla_seam.nightly import gpu
    from mla_seam.suite import trees

    work = tmp_path / "trees"
    staged = {"a": {"trees": {k: str(v) for k, v in trees.stage("0.16.1", None, work).items()}}}
    records = gpu.run_suites(staged, tmp_path / "results", work, devices=[0, 1])
    assert records["a"]["verdict"] == "none"
    assert records["a"]["error"].startswith("no verdict (suite exit 18)"), records
    assert len(list((work / "logs").glob("*.log"))) == 1


def test_github_layer_records_argv_and_reads_404_as_missing(tmp_path):
    """The one layer: argv and payload recorded (and logged); GitHub's 404 on a label read is
    'not there', any other failure a GitHubError (the job broke, exit 26)."""
    from mla_seam.errors import GitHubError

    seen = []

    def runner(argv, payload):
        seen.append((list(argv), payload))
        if argv[4].endswith("labels/mla-seam-drift"):
            raise GitHubError("gh api failed (exit 1): HTTP 404: Not Found")
        if argv[4].endswith("issues"):
            return '{"number": 7}'
        raise GitHubError("gh api failed (exit 1): HTTP 403: Resource not accessible")

    gh = github.GitHub("acme/mla-seam", runner=runner, log_path=tmp_path / "calls.jsonl")
    with pytest.raises(GitHubError, match="403"):
        gh.ensure_label("mla-seam-drift", "d")  # the read is a 404, the create is refused
    assert gh.create_issue("t", "b", ["mla-seam-drift"]) == 7
    assert [a[:5] for a, _ in seen] == [
        ["gh", "api", "--method", "GET", "repos/acme/mla-seam/labels/mla-seam-drift"],
        ["gh", "api", "--method", "POST", "repos/acme/mla-seam/labels"],
        ["gh", "api", "--method", "POST", "repos/acme/mla-seam/issues"],
    ]
    assert json.loads(seen[-1][1]) == {"body": "b", "labels": ["mla-seam-drift"], "title": "t"}
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 3


def test_report_posts_a_gpu_verdict_once_on_the_pull_request_and_the_issue(tmp_path):
    out = tmp_path / "out"
    target = targets.Target("main", "branch", "upstream-main", "e" * 40, "0.21.0", "0.21",
                            "core_v0.19", action="propose")  # fmt: skip
    (out / "gpu").mkdir(parents=True)
    (out / "targets.json").write_text(json.dumps({"targets": [target.to_json()]}))
    verdict = {
        "verdict": "overlay_broke", "counts": {"overlay broke": 1, "unchanged": 9},
        "findings": ["overlay broke: bench thd 256: 2.1x slower patched"], "fingerprint": "g1",
        "commit": target.commit, "base": "0.19.2", "card": "h200", "dry_run": False,
        "at": "2026-12-03T04:00:00+00:00",
    }  # fmt: skip
    (out / "gpu" / "verdicts.json").write_text(json.dumps({"main": verdict}))
    data = state.empty()
    data["targets"]["main"] = {"proposal": {"pr": 5}, "issue": {"number": 6, "open": True}}
    folder = out / "state"
    state.save(folder, data)
    gh = github.GitHub("acme/mla-seam", dry_run=True)
    args = nightly.build_parser().parse_args(["--out", str(out), "--phase", "report"])
    job = nightly.Job(out, phase="report")
    publish.run_report(job, args, folder, gh)
    posted = [(c["argv"][4], c["payload"]["body"]) for c in gh.calls]
    assert [p[0] for p in posted] == [
        "repos/acme/mla-seam/issues/5/comments", "repos/acme/mla-seam/issues/6/comments"
    ]  # fmt: skip
    assert "**overlay_broke**" in posted[0][1] and "2.1x slower patched" in posted[0][1]
    assert job.exit_code == nightly.EXIT_OVERLAY_BROKE  # the report job fails for it
    assert state.load(folder)["targets"]["main"]["gpu"]["fingerprint"] == "g1"
    assert len((folder / "gpu-history.jsonl").read_text().splitlines()) == 1
    publish.run_report(nightly.Job(out, phase="report"), args, folder, gh)
    assert len(gh.calls) == 2  # the same verdict again: nobody is notified twice


def _cpu_night(tmp_path, name, clone, project, follow="main"):
    """The CPU phase alone; its exit code and the targets it decided, by name."""
    out = tmp_path / name
    code = nightly.main([
        "--phase", "cpu", "--out", str(out), "--megatron", str(clone), "--remote", "origin",
        "--since", "0.19.2", "--no-discover", "--no-plot", "--follow", follow,
        "--project", str(project), "--state", str(tmp_path / "state"),
    ])  # fmt: skip
    plan = json.loads((out / "targets.json").read_text())["targets"]
    return code, {t["name"]: t for t in plan}


def _move_upstream(pusher: Path, parent: str, files: dict, message: str) -> str:
    """Push a commit on upstream main (the bare the clone fetches from) that writes ``files``."""
    repo = gitlayer.open_repo(pusher)
    commit = gitlayer.commit_files(repo, parent, files, message, ("Upstream", "u@example.com"),
                                   DATE)  # fmt: skip
    assert gitlayer.push_ref(repo, "origin", commit, "refs/heads/main")[0]
    return commit


@pytest.mark.slow
def test_main_is_ok_until_its_series_would_change(upstream_remote, project, repo_bundle, tmp_path):
    """After main's proposal is merged: ok at the commit patches/main was made from; ok after a
    commit that touches no hooked file (the rebase writes the checked-in folder, but for its
    snapshot), while a release tag on that commit gets its own patches/core_v0.21/; a commit
    that moves a hooked file gets a proposal that updates patches/main."""
    from mla_seam import cli

    bare = Path(shutil.copytree(upstream_remote.bare, tmp_path / "upstream.git"))  # moved here
    clone, pusher = tmp_path / "megatron", tmp_path / "pusher"
    gitlayer.clone(bare.as_uri(), clone, filter_spec="blob:none", sparse=SPARSE)
    gitlayer.clone(bare.as_uri(), pusher)
    # The first night's proposal, merged: patches/main made from upstream main by the rebase.
    merged = ["--megatron", str(clone), "--onto", "main", "--from", "0.19", "--write"]
    assert cli.main(["rebase", *merged, "--accept-three-way"]) == 0
    checked_in = targets.folder_digest(repo_bundle / "patches" / "main")

    code, found = _cpu_night(tmp_path, "at-snapshot", clone, project)
    assert code == 17  # core_v0.20.0 still needs a human
    main = found["main"]
    assert (main["action"], main["series"], main["proposal"]) == ("ok", "main", None)
    assert "made from" in main["note"]

    notes = {"CHANGELOG.md": b"upstream notes\n"}
    readme = _move_upstream(pusher, upstream_remote.commits["main"], notes, "upstream: notes\n")
    # ... and upstream releases it (main says 0.21.0): a new release tag on the same commit.
    assert gitlayer.push_ref(
        gitlayer.open_repo(pusher), "origin", readme, "refs/tags/core_v0.21.0"
    )[0]
    code, found = _cpu_night(tmp_path, "readme", clone, project)
    main = found["main"]
    assert main["commit"] == readme and main["classes"] == {h: "exact" for h in main["classes"]}
    assert (main["action"], main["proposal"]) == ("ok", None)
    assert "the rebase writes the checked-in patches/main" in main["note"]
    release = found["core_v0.21.0"]  # the new release still proposes a line of its own
    assert (release["kind"], release["action"]) == ("release", "propose")
    assert release["proposal"]["line_dir"] == "core_v0.21"
    line = tmp_path / "readme" / release["proposal"]["folder"] / "bundle" / "patches"
    assert json.loads((line / "core_v0.21" / "manifest.json").read_text())["releases"] == [
        "0.21.0"
    ]  # fmt: skip
    assert targets.folder_digest(line / "main") == checked_in  # main's series left alone
    written = tmp_path / "readme" / "proposals" / "main" / "bundle" / "patches" / "main"
    assert targets.folder_digest(written) == checked_in  # but for the snapshot it records
    assert json.loads((written / "manifest.json").read_text())["releases"] == [
        f"main@{readme[:10]}"
    ]  # fmt: skip

    lm = gitlayer.read_file_at(gitlayer.open_repo(pusher), readme, LM)
    hooked = _move_upstream(pusher, readme, {LM: lm + b"# upstream: a last line\n"}, "lm\n")
    code, found = _cpu_night(tmp_path, "hooked", clone, project)
    main = found["main"]
    assert main["commit"] == hooked and main["action"] == "propose", main
    assert any(  # served by trial, not refused: the reason says what to run
        "is not the pre-image main recorded at main@" in r and "rebase --onto main --write" in r
        for r in main["reasons"]
    ), main["reasons"]
    assert main["proposal"]["line_dir"] == "main" and not main["proposal"]["unchanged"]
    written = tmp_path / "hooked" / main["proposal"]["folder"] / "bundle" / "patches" / "main"
    assert targets.folder_digest(written) != checked_in
    assert json.loads((written / "manifest.json").read_text())["releases"] == [
        f"main@{hooked[:10]}"
    ]  # fmt: skip
    assert (
        repo_bundle.joinpath("patches", "main", "manifest.json").read_bytes()
        != (written / "manifest.json").read_bytes()
    )  # the installed bundle is never written by the nightly
