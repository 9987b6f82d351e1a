"""Upstream's moving targets (main, dev) served like release lines.

Two halves:

* CI (no upstream clone): a synthetic upstream made from the 0.19.2 sdist checkout, with a
  ``main`` branch (0.20.0, hooks moved) and a ``dev`` branch (says 0.19.0, two hook contexts
  rewritten), and the synthetic 0.19 series of ``test_series``. The product's own rebase writes
  ``patches/main`` (survey, ``--write``) and ``patches/dev`` (``--keep``, two hooks by hand,
  ``--resolved --write``); then selection by content and by trial, apply / revert / commit mode,
  refusals, and the suite's staging of a ``git archive`` run on real trees.
* Real series (``$MLA_SEAM_UPSTREAM_CLONE``: a clone of NVIDIA/Megatron-LM; skipped without
  one): the repository's ``patches/main`` and ``patches/dev`` on main and dev at the commits
  they record and at older commits no manifest records, the 0.19.0 tag, and the rebase that made
  them (H9 obsolete on dev, H3 merged 3-way on main).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict

import pytest
import support
from mla_seam import cli, gitlayer, releases
from mla_seam.errors import PreimageUnavailableError
from mla_seam.series import load_series, series_by_name
from mla_seam.suite import lines
from mla_seam.suite.trees import Source, applied_line, inspect_tree, stage
from mla_seam.survey import series_for_ref
from support import LM, MLA, REPO_ROOT, insert_lines, set_version, snapshot

DATE = "2026-12-03T00:00:00+00:00"

# --- naming ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref,target",
    [
        ("dev", "dev"),
        ("main", "main"),
        ("origin/dev", "dev"),
        ("refs/heads/main", "main"),
        ("refs/remotes/upstream/dev", "dev"),
        ("upstream-main", "main"),  # where the nightly lands a followed branch
        ("refs/heads/upstream-dev", "dev"),
        ("upstream-feature", None),  # followed, but no moving target: no series of its own
        ("origin/upstream-main", None),
        ("feature/x/dev", None),
        ("refs/tags/dev", None),
        ("core_v0.19.2", None),
        ("d48bd6be0a", None),
        ("develop", None),
    ],
)
def test_a_ref_names_a_moving_target(ref, target):
    assert releases.moving_target(ref) == target


def test_followed_branches_land_beside_the_clones_own_and_name_their_series_folder():
    assert releases.followed_ref("dev") == "upstream-dev"
    assert [releases.followed_branch(r) for r in ("upstream-dev", "refs/heads/upstream-x")] == [
        "dev", "x"
    ]  # fmt: skip
    assert [releases.followed_branch(r) for r in ("dev", "upstream-", "a/upstream-dev")] == [
        None, None, None
    ]  # fmt: skip
    assert releases.series_folder("upstream-main", "0.20.0") == "main"
    assert releases.series_folder("main", "0.20.0") == "main"
    assert releases.series_folder("core_v0.20.0", "0.20.0") == "core_v0.20"
    assert releases.series_folder("upstream-feature", "0.21.0") == "core_v0.21"


def test_a_series_records_the_commit_it_was_made_from():
    label = releases.snapshot("dev", "d48bd6be0a85cc0d6d3cc71e8750cf357cc6bdb1")
    assert label == "dev@d48bd6be0a"
    assert releases.parse_snapshot(label) == ("dev", "d48bd6be0a")
    assert releases.parse_snapshot("0.19.2") is None


def test_lines_are_listed_releases_first_then_the_moving_targets():
    names = ["dev", "core_v0.9", "zz", "main", "core_v0.19", "core_v0.13"]
    assert releases.line_order(names) == [
        "core_v0.9", "core_v0.13", "core_v0.19", "main", "dev", "zz"
    ]  # fmt: skip


# --- a synthetic upstream with main and dev ----------------------------------------------------


def _commit(root: Path, message: str) -> str:
    return gitlayer.commit_all(gitlayer.open_repo(root), message, DATE)


def _edit_line(root: Path, rel: str, number: int, text: str) -> None:
    """Replace line ``number`` (1-based) of ``rel``."""
    path = root / rel
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = text.encode()
    path.write_bytes(b"\n".join(lines))


@pytest.fixture(scope="module")
def upstream(fresh_checkout, seam_base, tmp_path_factory) -> Dict[str, object]:
    """The synthetic upstream, a bundle copy with patches/main and patches/dev written by the
    product's rebase, and what each step reported."""
    base = tmp_path_factory.mktemp("moving")
    bundle = shutil.copytree(support.synthetic_bundle(fresh_checkout, seam_base), base / "b")
    up = fresh_checkout("0.19.2", base / "upstream")
    repo = gitlayer.open_repo(up)
    gitlayer.checkout_branch(repo, "dev", "core_v0.19.2")
    _edit_line(up, MLA, 40, "        # dev: attention reorganised (context of the synthetic H1)")
    _edit_line(up, LM, 20, "# dev: backends reorganised (context of the synthetic H3)")
    set_version(up, "0.19.0")
    dev = _commit(up, "dev: reorganise attention and backends")
    gitlayer.checkout_branch(repo, "main", "core_v0.19.2")
    insert_lines(up, [(LM, 2, "# main: two new lines"), (LM, 2, "# main: above the hooks")])
    set_version(up, "0.20.0")
    main = _commit(up, "main: moves on")
    out: Dict[str, object] = {"up": up, "bundle": bundle, "dev": dev, "main": main}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLA_SEAM_ROOT", str(bundle))
        survey = base / "main.json"
        args = ["--megatron", str(up), "--onto", "main", "--from", "0.19"]
        out["main_code"] = cli.main(["rebase", *args, "--write", "--json", str(survey)])
        out["main_survey"] = json.loads(survey.read_text())
        survey = base / "dev.json"
        keep = base / "keep"
        args = ["--megatron", str(up), "--onto", "dev", "--from", "0.19", "--json", str(survey)]
        out["dev_code"] = cli.main(["rebase", *args, "--keep", str(keep)])
        out["dev_survey"] = json.loads(survey.read_text())
        notes = gitlayer.git_dir(gitlayer.open_repo(keep)) / "mla-seam-rebase"
        for hook, rel, after, text in (
            ("H1", MLA, 40, "# mla-seam hook H1"),
            ("H3", LM, 20, "# mla-seam hook H3"),
        ):
            insert_lines(keep, [(rel, after, text)])
            message = next(notes.glob(f"*-{hook}-*.msg")).read_text()
            _commit(keep, message)
        resolved = ["--megatron", str(keep), "--onto", "dev", "--from", "0.19"]
        out["resolved_code"] = cli.main(
            ["rebase", *resolved, "--resolved", "mla-seam/rebase", "--write"]
        )
    return out


@pytest.fixture
def env(upstream, monkeypatch) -> Dict[str, str]:
    """Environment of CLI subprocesses (and this process) using the bundle with main and dev."""
    monkeypatch.setenv("MLA_SEAM_ROOT", str(upstream["bundle"]))
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "scripts"), environ.get("PYTHONPATH")])
    )
    return environ


def _checkout(upstream, dest: Path, ref: str) -> Path:
    """A writable clone of the synthetic upstream at ``ref`` (branch ``work``)."""
    repo = gitlayer.clone_shared(upstream["up"], dest)
    commit = gitlayer.resolve_commit(repo, ref) or gitlayer.resolve_commit(repo, f"origin/{ref}")
    assert commit, ref
    gitlayer.checkout_branch(repo, "work", commit)
    return dest


def _seam(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _classes(survey: dict) -> Dict[str, str]:
    return {p["hook"]: p["class"] for p in survey["patches"]}


def test_rebase_writes_main_and_dev_as_their_own_series(upstream):
    assert upstream["main_code"] == 0
    assert _classes(upstream["main_survey"]) == {"H1": "exact", "H2": "exact", "H3": "offset"}
    assert upstream["dev_code"] == 16  # H1 and H3 conflict: written by hand, then exported
    dev_survey = upstream["dev_survey"]
    assert _classes(dev_survey) == {"H1": "conflict", "H2": "offset", "H3": "conflict"}
    culprits = {
        c["commit"] for p in dev_survey["patches"] for h in p["hunks"] for c in h["culprits"]
    }
    assert culprits == {upstream["dev"]}
    assert upstream["resolved_code"] == 0
    patches = Path(upstream["bundle"]) / "patches"
    for target in ("main", "dev"):
        series = load_series(patches / target)
        commit = upstream[target]
        assert series.line == target and series.releases == (releases.snapshot(target, commit),)
        assert series.upstream == {"tag": target, "commit": commit, "source": f"git {target}"}
        assert [p.name.split("-")[3] for p in series.patches] == (
            ["H1", "H2", "H3"] if target == "main" else ["H2", "H1", "H3"]
        )
    assert (patches / "core_v0.19").is_dir() and not (patches / "core_v0.20").exists()


def test_each_target_is_picked_by_content_and_applies_both_ways(upstream, env, tmp_path):
    for target in ("dev", "main"):
        tree = _checkout(upstream, tmp_path / target, target)
        before = snapshot(tree)
        status = _seam(env, "apply", "--status", str(tree))
        assert status.returncode == 21, status.stderr
        assert f"{target} (selected by content" in status.stdout
        done = _seam(env, "apply", str(tree))
        assert done.returncode == 0 and f"applied {target} " in done.stdout, done.stderr
        assert _seam(env, "apply", "--revert", str(tree)).returncode == 0
        assert snapshot(tree) == before
        head = gitlayer.head_commit(gitlayer.open_repo(tree))
        done = _seam(env, "apply", "--commit", str(tree))
        assert done.returncode == 0, done.stderr
        repo = gitlayer.open_repo(tree)
        assert len(gitlayer.rev_list(repo, f"{head}..HEAD")) == 4  # three hooks, the adapter
        assert _seam(env, "apply", "--revert", str(tree)).returncode == 0
        assert not repo.git.diff(head, "HEAD") and snapshot(tree)[0] == before[0]


def test_a_commit_no_manifest_records_is_served_by_trial(upstream, env, tmp_path):
    """A later commit of dev (and of main) that moved a hooked file: the target whose every hunk
    applies strictly, chosen among the version's line and the moving targets."""
    for target, version in (("dev", "0.19.0"), ("main", "0.20.0")):
        tree = _checkout(upstream, tmp_path / target, target)
        insert_lines(tree, [(MLA, 5, f"# {target}: a later commit")])
        _commit(tree, f"{target}: later")
        before = snapshot(tree)
        status = _seam(env, "apply", "--status", str(tree))
        line = status.stdout.splitlines()[1]
        assert f"{target} (selected by trial: {target} applies strictly (" in line, line
        assert f"package_info says {version}" in line
        if target == "dev":
            assert "core_v0.19: 2 of 3 patches do not apply" in line
        done = _seam(env, "apply", str(tree))
        assert done.returncode == 0 and "on a fork" in done.stdout, done.stderr
        assert _seam(env, "apply", "--status", str(tree)).stdout.startswith("applied on a fork")
        assert _seam(env, "apply", "--revert", str(tree)).returncode == 0
        assert snapshot(tree) == before


def test_a_fork_of_a_release_stays_on_its_line(upstream, env, tmp_path):
    tree = _checkout(upstream, tmp_path / "fork", "core_v0.19.2")
    insert_lines(tree, [(MLA, 5, "# fork: our own line")])
    _commit(tree, "fork: own line")
    status = _seam(env, "apply", "--status", str(tree))
    assert "core_v0.19 (selected by version" in status.stdout, status.stdout


def test_a_dev_fork_that_moved_a_hook_is_refused_with_its_commit(upstream, env, tmp_path):
    """Nothing applies strictly; dev is the nearest (1 patch off, 0.19's line 2): apply names
    the fork's commit that changed the hunk's context and leaves the tree alone."""
    tree = _checkout(upstream, tmp_path / "fork", "dev")
    _edit_line(tree, MLA, 39, "        # fork: rewritten right above the hook")
    fork = _commit(tree, "fork: rewrite above the hook")
    before = snapshot(tree)
    status = _seam(env, "apply", "--status", str(tree))
    assert "dev (selected by trial: dev is the nearest: 1 of 3 patches does not apply" in (
        status.stdout
    )
    refused = _seam(env, "apply", str(tree))
    assert refused.returncode == 6, refused.stderr
    assert (
        fork[:7] in refused.stderr and "fork: rewrite above the hook" in refused.stderr
    ), refused.stderr
    assert snapshot(tree) == before


def test_three_way_on_a_target_takes_its_files_from_the_clone_or_names_the_commit(
    upstream, env, tmp_path
):
    """A moving target has no sdist: a dev fork whose repository lacks dev's files gets exit 30
    naming the commit to fetch, tree unchanged; once fetched, --3way merges and reverts."""
    fork = _checkout(upstream, tmp_path / "fork", "dev")
    _edit_line(fork, MLA, 39, "        # fork: rewritten right above the hook")
    tree = tmp_path / "tree"
    shutil.copytree(fork, tree, ignore=shutil.ignore_patterns(".git"))
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    _commit(tree, "the fork, imported without its history")
    before = snapshot(tree)
    dev = str(upstream["dev"])
    for flags in (["--check", "--3way"], ["--3way"], ["--commit", "--3way"]):
        refused = _seam(env, "apply", "--series", "dev", *flags, str(tree))
        assert refused.returncode == PreimageUnavailableError.exit_code, refused.stderr
        assert f"git fetch origin {dev}" in refused.stderr and "Traceback" not in refused.stderr
        assert snapshot(tree) == before
    subprocess.run(["git", "fetch", "-q", str(upstream["up"]), "dev"], cwd=tree, check=True)
    merged = _seam(env, "apply", "--series", "dev", "--3way", str(tree))
    assert merged.returncode == 0 and "merged 3-way" in merged.stdout, merged.stderr
    assert _seam(env, "apply", "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def test_a_newer_version_nothing_serves_names_the_nearest_series(upstream, env, tmp_path):
    tree = _checkout(upstream, tmp_path / "main", "main")
    _edit_line(tree, MLA, 39, "        # main fork: rewritten right above the hook")
    _commit(tree, "main fork")
    before = snapshot(tree)
    refused = _seam(env, "apply", str(tree))
    assert refused.returncode == 5
    message = refused.stderr.strip()
    assert message.count("\n") == 0, message
    assert "main: 1 of 3 patches does not apply" in message
    assert "to try the nearest, pass --series main" in message and "--series core_v0.19" in message
    assert snapshot(tree) == before


def test_rebase_of_a_target_starts_from_its_own_series(upstream, env, tmp_path, capsys):
    code = cli.main(["rebase", "--megatron", str(upstream["up"]), "--onto", "origin/dev"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("mla-seam rebase: dev (base dev) onto origin/dev")
    assert "result: 3 exact" in out


def test_rebase_refuses_a_checkout_without_the_targets_commit(env, fresh_checkout, tmp_path):
    plain = fresh_checkout("0.19.2", tmp_path / "plain")
    done = _seam(env, "rebase", "--megatron", str(plain), "--onto", "core_v0.19.2", "--from", "dev")
    assert done.returncode == 16
    assert "the dev series was made from dev at" in done.stderr and "git fetch" in done.stderr


def test_drift_and_rebase_pick_a_targets_series_by_ref(upstream, env, fresh_checkout, tmp_path):
    lines = [load_series(p) for p in sorted((Path(upstream["bundle"]) / "patches").iterdir())]
    assert series_for_ref(lines, "origin/dev", "0.19.0")[0].name == "dev"
    has = gitlayer.open_repo(upstream["up"])
    assert series_for_ref(lines, "dev", "0.19.0", has)[0].name == "dev"
    lacks = gitlayer.open_repo(fresh_checkout("0.19.2", tmp_path / "plain"))
    assert series_for_ref(lines, "dev", "0.19.0", lacks) == (series_by_name("core_v0.19"), False)
    assert series_for_ref(lines, "main", "0.20.0")[0].name == "main"
    assert series_for_ref(lines, "core_v0.19.2", "0.19.2") == (series_by_name("core_v0.19"), True)
    assert series_for_ref(lines, "core_v0.19.0", "0.19.0")[0].name == "core_v0.19"


def test_the_suite_files_a_target_under_its_name(upstream, env, tmp_path):
    """``stage`` of a :class:`Source` archive: vanilla and patched trees from a ``git archive``
    of megatron/; the patched tree's results folder is the target's name (dev's package_info
    says 0.19.0), and ``--target ARCHIVE:BASE`` plans the target's line under that name."""
    tree = _checkout(upstream, tmp_path / "dev", "dev")
    archive = tmp_path / "dev.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "megatron", arcname="megatron")
    trees = stage(Source.of_archive(archive), None, tmp_path / "work")
    assert sorted(trees) == ["patched", "vanilla"]
    assert trees["patched"] == tmp_path / "work" / "patched-dev"
    assert inspect_tree(trees["patched"], "--megatron").tag == "dev"
    line = lines.target_line(f"{archive}:none=parity", tmp_path / "out", tmp_path / "work")
    assert line.key == "dev" and line.trees == trees and line.units == {"parity"}
    vanilla = inspect_tree(trees["vanilla"], "--vanilla-megatron")
    assert vanilla.tag == "core_v0.19.0" and not vanilla.patched
    worktree = tmp_path / "wt"
    gitlayer.open_repo(tree).git.worktree("add", "--quiet", "--detach", str(worktree), "HEAD")
    assert _seam(env, "apply", str(worktree)).returncode == 0
    assert (worktree / ".git").is_file() and applied_line(worktree) == "dev"
    assert inspect_tree(worktree, "--megatron").tag == "dev"


# --- the real series on real trees ($MLA_SEAM_UPSTREAM_CLONE) ---------------------------------


def _real_env() -> Dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "MLA_SEAM_ROOT"}
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "scripts"), environ.get("PYTHONPATH")])
    )
    return environ


@pytest.mark.parametrize("target", releases.MOVING_TARGETS)
def test_real_target_applies_with_no_flags_and_reverts_exactly(target, target_checkout, tmp_path):
    tree = target_checkout(target, tmp_path / target)
    environ, before = _real_env(), snapshot(tree)
    status = _seam(environ, "apply", "--status", str(tree))
    assert f"  {target} (selected by content" in status.stdout, status.stdout
    piped = subprocess.run(
        f"{REPO_ROOT}/scripts/apply.sh {tree} | head -1; echo rc=${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert piped.stdout.splitlines() == [f"{target} for megatron-core {_version(tree)}: 5 file(s) "
                                         "written", "rc=0"], piped.stdout + piped.stderr  # fmt: skip
    assert _seam(environ, "apply", "--status", str(tree)).stdout.startswith("applied\n")
    assert _seam(environ, "apply", "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before
    repo = gitlayer.open_repo(tree)
    head = gitlayer.head_commit(repo)
    done = _seam(environ, "apply", "--commit", str(tree))
    assert done.returncode == 0, done.stderr
    count = len(load_series(REPO_ROOT / "patches" / target).patches)
    assert len(gitlayer.rev_list(repo, f"{head}..HEAD")) == count + 1
    assert _seam(environ, "apply", "--revert", str(tree)).returncode == 0
    assert not repo.git.diff(head, "HEAD") and snapshot(tree)[0] == before[0]


def _version(tree: Path) -> str:
    return releases.read_version(tree)


#: dev's first-parent commit that brought the context-parallel layouts H10 (0008) answers:
#: NVIDIA/Megatron-LM #6387, 3 commits before the recorded d48bd6be0a (the 2 between leave every
#: hooked file as recorded, so no real dev commit after it is served by trial rather than content).
DEV_CP_LAYOUTS_BACK = 3


@pytest.mark.parametrize("target", releases.MOVING_TARGETS)
def test_real_target_ten_commits_back_is_served_by_trial(target, target_checkout, tmp_path):
    """main ten commits back: served by trial. dev: a later commit that moved a hooked file is
    served by trial; ten commits back (before #6387's layouts) H10 has nothing to hook, and the
    refusal names it."""
    environ = _real_env()
    if target == "dev":
        old = target_checkout(target, tmp_path / "old", back=10)
        before = snapshot(old)
        status = _seam(environ, "apply", "--status", str(old))
        assert (
            "dev is the nearest: 1 of 8 patches does not apply (0008)" in status.stdout
        ), status.stdout
        assert _seam(environ, "apply", str(old)).returncode != 0
        assert snapshot(old) == before
        layouts = target_checkout(target, tmp_path / "layouts", back=DEV_CP_LAYOUTS_BACK)
        assert "(selected by content" in _seam(environ, "apply", "--status", str(layouts)).stdout
        tree = target_checkout(target, tmp_path / target)
        insert_lines(tree, [(MLA, 5, "# dev: a later commit")])
        _commit(tree, "dev: later")
    else:
        tree = target_checkout(target, tmp_path / target, back=10)
    before = snapshot(tree)
    status = _seam(environ, "apply", "--status", str(tree))
    assert (
        f"  {target} (selected by trial: {target} applies strictly" in status.stdout
    ), status.stdout
    assert _seam(environ, "apply", str(tree)).returncode == 0
    assert _seam(environ, "apply", "--revert", str(tree)).returncode == 0
    assert snapshot(tree) == before


def test_real_release_tag_keeps_its_line(upstream_clone, tmp_path):
    repo = gitlayer.clone_shared(upstream_clone, tmp_path / "tag")
    if gitlayer.resolve_commit(repo, "core_v0.19.0") is None:
        pytest.skip(f"{upstream_clone} has no tag core_v0.19.0")
    gitlayer.checkout_branch(repo, "work", "core_v0.19.0")
    status = _seam(_real_env(), "apply", "--status", str(tmp_path / "tag"))
    assert "core_v0.19 (selected by content" in status.stdout, status.stdout
    assert "megatron-core 0.19.1" in status.stdout  # upstream's tag says 0.19.1


def _survey(environ, checkout: Path, onto: str, line: str, tmp_path: Path, *extra: str):
    out = tmp_path / f"{onto}-{line}.json"
    args = ["rebase", "--megatron", str(checkout), "--onto", onto, "--from", line]
    done = _seam(environ, *args, "--json", str(out), *extra)
    return done, json.loads(out.read_text()) if out.is_file() else None


def test_real_rebase_from_019_says_what_moved(target_checkout, tmp_path):
    """What the committed series were made from: on dev H1 and H4 conflict (written by hand)
    and H9 is obsolete (the QK-norm resolver is gone); on main H3 merges 3-way only."""
    environ = _real_env()
    dev = target_checkout("dev", tmp_path / "dev")
    done, survey = _survey(environ, dev, "dev", "0.19", tmp_path)
    assert done.returncode == 16 and survey is not None, done.stderr
    classes = _classes(survey)
    assert classes["H9"] == "obsolete" and classes["H1"] == classes["H4"] == "conflict"
    h9 = next(p for p in survey["patches"] if p["hook"] == "H9")
    assert h9["detail"] == "Obsolete-If: mla.qk_norm_resolver=false holds"
    assert "H9" in done.stdout and "obsolete" in done.stdout
    main = target_checkout("main", tmp_path / "main")
    done, survey = _survey(environ, main, "main", "0.19", tmp_path)
    assert done.returncode == 0 and _classes(survey)["H3"] == "three_way", done.stderr
    assert {c for h, c in _classes(survey).items() if h != "H3"} <= {"exact", "offset"}


@pytest.mark.parametrize("target", releases.MOVING_TARGETS)
def test_real_target_series_is_reproduced_byte_for_byte(target, target_checkout, tmp_path):
    """The committed series re-exported onto the commit it records: every file identical."""
    checkout = target_checkout(target, tmp_path / target)
    bundle = tmp_path / "bundle"
    for name in ("patches", "overlay"):
        shutil.copytree(REPO_ROOT / name, bundle / name)
    environ = dict(_real_env(), MLA_SEAM_ROOT=str(bundle))
    done, survey = _survey(environ, checkout, target, target, tmp_path, "--write")
    assert done.returncode == 0, done.stderr
    assert set(_classes(survey).values()) == {"exact"}
    assert f"{len(_files(REPO_ROOT / 'patches' / target))} file(s) unchanged" in done.stdout
    assert _files(bundle / "patches" / target) == _files(REPO_ROOT / "patches" / target)
    assert (
        load_series(REPO_ROOT / "patches" / target).upstream["commit"] == survey["onto"]["commit"]
    )


def _files(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
