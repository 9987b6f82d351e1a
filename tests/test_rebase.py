"""``mla-seam rebase`` on real checkouts built from PyPI sdists (no mocks of git).

One checkout holds six releases (0.13.1, 0.14.0, 0.16.1, 0.17.1, 0.18.2, 0.19.2: a root commit
each, as ``mla-seam upstream get --into`` makes them). Synthetic upstream commits on top of
core_v0.16.1 give the survey real history: a hook's change landing upstream, and an edit in a
hunk's context with the commit that made it. ``--write`` always targets a copy of the bundle
(``MLA_SEAM_ROOT``), never the repository's own ``patches/``.

Its fixtures (``combo``, ``repo_bundle``) are in conftest.py, its helpers in support.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from mla_seam import cli, gitlayer, upstream
from mla_seam.releases import MOVING_TARGETS
from mla_seam.series import load_series
from mla_seam.survey import PatchClass, split_hunks
from support import newest_fast

from support import (  # noqa: F401  (shared with test_drift, test_nightly)
    COMBO,
    LM,
    MLA,
    REBASE_DATE,
    REPO,
    TC,
    TL,
    commit_all,
    edit,
    files_of,
    make_bundle,
    repo_state,
    run,
    run_subprocess,
)

DATE = REBASE_DATE


def survey_json(capsys, tmp_path: Path, *args: str) -> Tuple[int, dict]:
    """Run rebase with ``--json`` and return the exit code and the survey."""
    out = tmp_path / f"survey-{len(list(tmp_path.glob('survey-*')))}.json"
    code, _ = run(capsys, "rebase", *args, "--json", str(out))
    return code, json.loads(out.read_text())


def classes(doc: dict) -> Dict[str, str]:
    """hook -> class of a survey."""
    return {p["hook"]: p["class"] for p in doc["patches"]}


def line_patch(line: str, hook: str) -> Path:
    """The repository's patch file of ``hook`` in ``patches/core_v<line>``."""
    found = [
        p for p in (REPO / "patches" / f"core_v{line}").glob("*.patch") if f"-{hook}-" in p.name
    ]
    assert len(found) == 1, (line, hook, found)
    return found[0]


# --- rebase from the 0.16 line onto newer lines -------------------------------------------------


@pytest.mark.parametrize(
    "onto,expected",
    [
        (
            "core_v0.17.1",
            {
                "H1": "offset",
                "H2": "offset",
                "H3": "offset",
                "H4": "offset",
                "H6": "obsolete",
                "H7": "offset",
                "H8": "offset",
            },
        ),
        (
            "core_v0.18.2",
            {
                "H1": "offset",
                "H2": "offset",
                "H3": "offset",
                "H4": "offset",
                "H6": "obsolete",
                "H7": "offset",
                "H8": "offset",
            },
        ),
        (
            "core_v0.19.2",
            {
                "H1": "offset",
                "H2": "offset",
                "H3": "offset",
                "H4": "offset",
                "H6": "obsolete",
                "H7": "offset",
                "H8": "offset",
            },
        ),
    ],
)
def test_rebase_016_onto_newer_lines_writes_series_that_apply(
    onto, expected, combo, repo_bundle, capsys, tmp_path, fresh_checkout
):
    before = repo_state(combo)
    code, doc = survey_json(
        capsys, tmp_path, "--megatron", str(combo), "--onto", onto, "--from", "0.16", "--write"
    )
    assert code == 0
    assert classes(doc) == expected
    assert doc["history"] is False and "sdist" in doc["history_note"]
    assert "mla-seam H6" in doc["range_diff"] and "<" in doc["range_diff"]
    changes = {c["probe"] for c in doc["contract_changes"]}
    assert "tl.cp_comm_type_index" in changes  # the reason H6 became obsolete
    line = upstream.line_of(onto.removeprefix("core_v"))
    written = load_series(repo_bundle / "patches" / f"core_v{line}")
    assert [p.name.split("-")[3] for p in written.patches] == ["H1", "H2", "H3", "H4", "H7", "H8"]
    assert written.upstream["tag"] == onto
    assert set(written.releases) == {v for v in upstream.RELEASES if upstream.line_of(v) == line}
    tree = fresh_checkout(onto, tmp_path / "tree")
    assert cli.main(["apply", str(tree)]) == 0
    assert repo_state(combo) == before


def test_survey_of_one_tag_leaves_checkout_and_patches_alone(combo, capsys):
    before, patches = repo_state(combo), files_of(REPO / "patches")
    code, out = run(
        capsys, "rebase", "--megatron", str(combo), "--onto", "core_v0.13.1", "--from", "0.19"
    )
    # 0.13 has no QK-norm resolver (0.19+), so H9 has nothing to work around there
    assert "H9  0008-mla-seam-H9-build-DeepSeek-s-query-path-when-q_lora_.patch: obsolete: " in out
    assert "Obsolete-If: mla.qk_norm_resolver=false holds" in out
    # H7's anchor (pp_rank, 0.15+) is 0.13's pipeline_rank after its decoder-start block
    assert code == 16
    assert "H7  0006-" in out and "megatron/core/transformer/transformer_layer.py @@" in out
    assert "contracts core_v0.19.2 -> core_v0.13.1" in out and "mla.rope_cu_seqlens" in out
    assert repo_state(combo) == before and files_of(REPO / "patches") == patches


# --- synthetic upstream history ----------------------------------------------------------------


@pytest.fixture
def synthetic(fresh_checkout, tmp_path: Path) -> Path:
    """A writable checkout of core_v0.16.1 to put synthetic upstream commits on."""
    return fresh_checkout("0.16.1", tmp_path / "upstream")


def test_patch_already_upstream_by_reverse_apply(synthetic, capsys, tmp_path):
    """Upstream merges H6's change (plus an unrelated edit): reported upstream, never dropped silently."""
    patch = line_patch("0.16", "H6")
    gitlayer.apply_patch(synthetic, patch)
    (synthetic / "README.md").write_text("unrelated upstream edit\n")
    merged = commit_all(synthetic, "upstream: take the per-layer cp_comm_type fix")
    gitlayer.create_tag(gitlayer.open_repo(synthetic), "synthetic-merge", merged)
    code, doc = survey_json(
        capsys,
        tmp_path,
        "--megatron",
        str(synthetic),
        "--onto",
        "synthetic-merge",
        "--from",
        "0.16",
    )
    assert code == 0
    h6 = next(p for p in doc["patches"] if p["hook"] == "H6")
    assert h6["class"] == "upstream" and "reverse-applies" in h6["detail"]
    assert h6["upstream_commit"]["commit"] == merged
    assert {p["hook"]: p["class"] for p in doc["patches"] if p["hook"] != "H6"} == {
        "H1": "exact",
        "H2": "exact",
        "H3": "exact",
        "H4": "exact",
        "H7": "exact",
        "H8": "exact",
    }
    assert doc["history"] is True
    assert "mla-seam H6" in doc["range_diff"]  # shown as dropped in the range-diff


def test_patch_already_upstream_by_patch_id(synthetic, capsys, tmp_path):
    """H3 lands upstream verbatim, then a later commit rewrites its context: the patch-id finds it."""
    patch = line_patch("0.16", "H3")
    gitlayer.apply_patch(synthetic, patch)
    cherry = commit_all(synthetic, "upstream: decide the MLA backend early")
    edit(
        synthetic / LM,
        "        def check_and_set_env_variable(\n",
        "        def check_and_set_env_variable(  # reformatted\n",
    )
    commit_all(synthetic, "upstream: comment")
    repo = gitlayer.open_repo(synthetic)
    gitlayer.create_tag(repo, "synthetic-pid", repo.git.rev_parse("HEAD"))
    code, doc = survey_json(
        capsys, tmp_path, "--megatron", str(synthetic), "--onto", "synthetic-pid", "--from", "0.16"
    )
    h3 = next(p for p in doc["patches"] if p["hook"] == "H3")
    assert h3["class"] == "upstream", h3
    assert "patch-id" in h3["detail"] and h3["upstream_commit"]["commit"] == cherry
    assert code == 0


def test_h7_is_obsolete_once_upstream_guards_the_middle_stages(synthetic, capsys, tmp_path):
    """Upstream guards the virtual-stage branch's division by the middle stage count (as its
    branch without virtual stages does): H7's Obsolete-If holds and the survey drops it."""
    edit(
        synthetic / TL,
        "                            // middle_pipeline_stages\n                        )\n",
        "                            // middle_pipeline_stages\n"
        "                            if middle_pipeline_stages > 0\n"
        "                            else 0\n"
        "                        )\n",
    )
    guarded = commit_all(synthetic, "upstream: no middle stage, no division")
    gitlayer.create_tag(gitlayer.open_repo(synthetic), "synthetic-guard", guarded)
    args = ("--megatron", str(synthetic), "--onto", "synthetic-guard", "--from", "0.16")
    code, doc = survey_json(capsys, tmp_path, *args)
    assert code == 0
    h7 = next(p for p in doc["patches"] if p["hook"] == "H7")
    assert h7["class"] == "obsolete", h7
    assert "tl.layer_offset_middle_stages_guarded=true" in h7["detail"]
    assert {k: v for k, v in classes(doc).items() if k != "H7"} == {
        "H1": "exact",
        "H2": "exact",
        "H3": "exact",
        "H4": "exact",
        "H6": "offset",  # two lines lower
        "H8": "exact",
    }
    assert "tl.layer_offset_middle_stages_guarded" in {c["probe"] for c in doc["contract_changes"]}


def test_edit_in_hunk_context_is_a_conflict_with_its_culprit(synthetic, capsys, tmp_path):
    """Upstream edits the context line right below H1's change; a later commit edits MLA
    elsewhere and another file (not culprits)."""
    edit(
        synthetic / MLA,
        "            submodules.core_attention,\n            config=self.config,\n",
        "            submodules.core_attention,\n            config=self.config,  # the layer's\n",
    )
    culprit = commit_all(synthetic, "upstream: annotate the core attention spec")
    with open(synthetic / MLA, "a", encoding="utf-8") as handle:
        handle.write("\n# unrelated upstream change at the end of the file\n")
    (synthetic / "README.md").write_text("another unrelated change\n")
    bystander = commit_all(synthetic, "upstream: unrelated edits")
    repo = gitlayer.open_repo(synthetic)
    gitlayer.create_tag(repo, "synthetic-context", bystander)
    before = repo_state(synthetic)
    patches = files_of(REPO / "patches")
    code, doc = survey_json(
        capsys,
        tmp_path,
        "--megatron",
        str(synthetic),
        "--onto",
        "synthetic-context",
        "--from",
        "0.16",
        "--write",
    )
    assert code == 16
    h1 = next(p for p in doc["patches"] if p["hook"] == "H1")
    assert h1["class"] == "conflict"
    (hunk,) = h1["hunks"]
    assert hunk["file"] == MLA and hunk["hunk"].startswith("@@ -152,")
    assert [c["commit"] for c in hunk["culprits"]] == [culprit]
    # H1 did not apply, so H2 sits one line higher than recorded; H3, H4 are untouched.
    assert {k: v for k, v in classes(doc).items() if k != "H1"} == {
        "H2": "offset",
        "H3": "exact",
        "H4": "exact",
        "H6": "exact",
        "H7": "exact",
        "H8": "offset",
    }
    assert repo_state(synthetic) == before
    assert files_of(REPO / "patches") == patches


# --- export ------------------------------------------------------------------------------------


def test_export_is_byte_identical_across_runs(combo, tmp_path, monkeypatch, capsys):
    outputs = []
    for k in range(2):
        root = make_bundle(tmp_path / f"bundle{k}")
        monkeypatch.setenv("MLA_SEAM_ROOT", str(root))
        code, _ = run(
            capsys,
            "rebase",
            "--megatron",
            str(combo),
            "--onto",
            "core_v0.17.1",
            "--from",
            "0.16",
            "--write",
        )
        assert code == 0
        outputs.append(files_of(root / "patches" / "core_v0.17"))
    assert outputs[0] == outputs[1]


def test_reexport_of_a_line_onto_its_own_base_keeps_every_byte(combo, repo_bundle, capsys):
    for line, base in (("0.16", "core_v0.16.1"), ("0.19", "core_v0.19.2")):
        before = files_of(REPO / "patches" / f"core_v{line}")
        code, out = run(
            capsys, "rebase", "--megatron", str(combo), "--onto", base, "--from", line, "--write"
        )
        assert code == 0
        assert f"{len(before)} file(s) unchanged (bytes kept), 0 changed" in out
        assert files_of(repo_bundle / "patches" / f"core_v{line}") == before


def test_hand_written_hook_workflow(synthetic, repo_bundle, capsys, tmp_path):
    """--keep, write the conflicting hook there, --resolved --write; the line then applies.

    Upstream puts a statement right below ``super().__post_init__()`` in
    ``MLATransformerConfig.__post_init__``, where H4 inserts its call: H4 conflicts (3-way too).
    """
    anchor = "    def __post_init__(self):\n        super().__post_init__()\n        if self.multi_latent_attention"
    moved = (
        "    def __post_init__(self):\n        super().__post_init__()\n"
        "        self.mla_checked = False\n        if self.multi_latent_attention"
    )
    edit(synthetic / TC, anchor, moved)
    gitlayer.create_tag(
        gitlayer.open_repo(synthetic), "synthetic-h4", commit_all(synthetic, "upstream: new line")
    )
    keep = tmp_path / "keep"
    args = ("rebase", "--megatron", str(synthetic), "--onto", "synthetic-h4", "--from", "0.16")
    code, out = run(capsys, *args, "--releases", "0.16.1", "--keep", str(keep))
    assert code == 16 and f"kept: {keep}" in out, out
    assert "H4  0004-" in out and "conflict" in out
    notes = keep / ".git" / "mla-seam-rebase"
    message = next(notes.glob("*H4*.msg")).read_text()
    edit(
        keep / TC,
        "        self.mla_checked = False\n",
        "        self.mla_checked = False\n"
        "        from megatron.core.transformer import mla_adapter\n"
        "        mla_adapter.check_config(self)\n",
    )
    repo = gitlayer.open_repo(keep)
    repo.git.add("--", TC)
    gitlayer.commit_replayed(repo, message, "mla-seam", "mla-seam@users.noreply.github.com", DATE)
    code, out = run(
        capsys,
        "rebase",
        "--megatron",
        str(keep),
        "--onto",
        "synthetic-h4",
        "--from",
        "0.16",
        "--releases",
        "0.16.1",
        "--resolved",
        "mla-seam/rebase",
        "--write",
    )
    assert code == 0, out
    assert "mla-seam H4: validate MLA config in MLATransformerConfig" in out
    assert "written by hand" in out
    assert "mla-seam H1: build MLA core attention through the adapter: as surveyed" in out
    written = load_series(repo_bundle / "patches" / "core_v0.16")
    hooks = [p.name.split("-")[3] for p in written.patches]
    assert hooks == ["H1", "H2", "H3", "H6", "H7", "H8", "H4"]
    assert cli.main(["apply", str(synthetic)]) == 0


# --- refreshing the overlay blob ---------------------------------------------------------------


def test_refresh_overlay_is_byte_stable(repo_bundle, capsys):
    code, out = run(capsys, "rebase", "--refresh-overlay", "--check")
    assert code == 0 and "stale: none" in out
    adapter = repo_bundle / "overlay" / "megatron/core/transformer/mla_adapter.py"
    adapter.write_bytes(adapter.read_bytes() + b"# edited\n")
    code, out = run(capsys, "rebase", "--refresh-overlay", "--check")
    assert code == 16 and "core_v0.13" in out and "core_v0.19" in out
    before = files_of(repo_bundle / "patches")
    assert run(capsys, "rebase", "--refresh-overlay")[0] == 0
    after = files_of(repo_bundle / "patches")
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == sorted(
        f"{d.name}/manifest.json" for d in (repo_bundle / "patches").iterdir() if d.is_dir()
    )
    blob = gitlayer.hash_blobs(
        repo_bundle / "overlay", ["megatron/core/transformer/mla_adapter.py"]
    )
    for name in changed:
        manifest = json.loads(after[name])
        assert manifest["overlay"] == blob
        load_series(repo_bundle / "patches" / name.split("/")[0])
    assert run(capsys, "rebase", "--refresh-overlay")[0] == 0
    assert files_of(repo_bundle / "patches") == after


# --- bad input ---------------------------------------------------------------------------------


def _refused(env, *args: str, code: int, needle: str) -> None:
    done = run_subprocess(env, "rebase", *args)
    assert done.returncode == code, done.stderr + done.stdout
    assert needle in done.stderr, done.stderr


def test_bad_inputs_are_refused_and_change_nothing(combo, repo_bundle, tmp_path, synthetic):
    env = {"MLA_SEAM_ROOT": str(repo_bundle)}
    patches, state = files_of(repo_bundle / "patches"), repo_state(combo)
    _refused(
        env,
        "--megatron",
        str(combo),
        "--onto",
        "core_v9.9.9",
        code=15,
        needle="unknown tag 'core_v9.9.9'",
    )
    (tmp_path / "empty").mkdir()
    _refused(
        env,
        "--megatron",
        str(tmp_path / "empty"),
        "--onto",
        "core_v0.17.1",
        code=4,
        needle="holds no megatron/core",
    )
    (synthetic / MLA).write_text((synthetic / MLA).read_text() + "# local edit\n")
    _refused(
        env,
        "--megatron",
        str(synthetic),
        "--onto",
        "core_v0.17.1",
        code=7,
        needle="uncommitted changes",
    )
    damaged = next((repo_bundle / "patches" / "core_v0.16").glob("*H2*.patch"))
    damaged.write_bytes(damaged.read_bytes().replace(b"normalize", b"normalise", 1))
    _refused(
        env,
        "--megatron",
        str(combo),
        "--onto",
        "core_v0.17.1",
        "--from",
        "0.16",
        code=8,
        needle="sha256",
    )
    damaged.write_bytes(patches[f"core_v0.16/{damaged.name}"])
    _refused(
        env,
        "--megatron",
        str(combo),
        "--onto",
        "core_v0.17.1",
        "--from",
        "0.99",
        code=2,
        needle="--from 0.99: no such release line",  # its own option, not --series
    )
    assert files_of(repo_bundle / "patches") == patches and repo_state(combo) == state


@pytest.mark.parametrize(
    "point,sig,code",
    [
        ("rebase-surveyed", "TERM", 143),
        ("rebase-staged", "TERM", 143),
        ("rebase-staged", "KILL", -9),
    ],
)
def test_interrupted_rebase_changes_nothing(combo, repo_bundle, point, sig, code):
    env = {
        "MLA_SEAM_ROOT": str(repo_bundle),
        "MLA_SEAM_CRASH_AT": point,
        "MLA_SEAM_CRASH_SIGNAL": sig,
    }
    patches, state = files_of(repo_bundle / "patches"), repo_state(combo)
    done = run_subprocess(
        env,
        "rebase",
        "--megatron",
        str(combo),
        "--onto",
        "core_v0.17.1",
        "--from",
        "0.16",
        "--write",
    )
    assert done.returncode == code, done.stderr
    if sig == "TERM":
        assert "interrupted by SIGTERM" in done.stderr
    visible = {
        k: v for k, v in files_of(repo_bundle / "patches").items() if not k.startswith(".rebase-")
    }
    assert visible == patches and repo_state(combo) == state
    # A later run sweeps what SIGKILL left behind and writes the line.
    done = run_subprocess(
        {"MLA_SEAM_ROOT": str(repo_bundle)},
        "rebase",
        "--megatron",
        str(combo),
        "--onto",
        "core_v0.17.1",
        "--from",
        "0.16",
        "--write",
    )
    assert done.returncode == 0, done.stderr
    assert not list((repo_bundle / "patches").glob(".rebase-*"))
    load_series(repo_bundle / "patches" / "core_v0.17")


# --- apply on every supported line -------------------------------------------------------------


def _served() -> List[Tuple[str, str]]:
    """Every release of every release line (main and dev: tests/test_moving_targets.py)."""
    rows = []
    for line_dir in sorted((REPO / "patches").iterdir()):
        if (line_dir / "manifest.json").is_file() and line_dir.name not in MOVING_TARGETS:
            for release in load_series(line_dir).releases:
                rows.append((line_dir.name, release))
    return rows


@pytest.mark.parametrize("line,release", newest_fast(_served(), version=lambda row: row[1]))
def test_apply_works_on_every_listed_release(line, release, fresh_checkout, tmp_path, capsys):
    tree = fresh_checkout(release, tmp_path / "tree")
    code, out = run(capsys, "apply", str(tree))
    assert code == 0 and f"applied {line}" in out
    assert (tree / "megatron/core/transformer/mla_adapter.py").is_file()


def test_every_hook_stays_small():
    """Each line's footprint outside the adapter: <= 40 changed lines, hunks of hooks only."""
    for line_dir in sorted((REPO / "patches").iterdir()):
        if not line_dir.is_dir():
            continue
        changed = 0
        for patch in line_dir.glob("*.patch"):
            diff = patch.read_text().split("\ndiff --git ", 1)[1]
            for _, hunk in split_hunks("diff --git " + diff):
                changed += sum(1 for ln in hunk.lines if ln[:1] in ("+", "-"))
        assert changed <= 40, (line_dir.name, changed)


def test_patch_class_values_are_stable():
    assert [c.value for c in PatchClass] == [
        "exact",
        "offset",
        "three_way",
        "conflict",
        "upstream",
        "obsolete",
    ]


def test_three_way_merge_is_flagged_and_needs_acceptance(synthetic, repo_bundle, capsys, tmp_path):
    """Upstream edits a context line of H1 two lines away from it: only a 3-way merge carries it."""
    edit(
        synthetic / MLA,
        "            attn_mask_type=self.attn_mask_type,\n            attention_type=",
        "            attn_mask_type=self.attn_mask_type,  # mask\n            attention_type=",
    )
    nearby = commit_all(synthetic, "upstream: annotate the mask type")
    gitlayer.create_tag(gitlayer.open_repo(synthetic), "synthetic-3way", nearby)
    args = ("--megatron", str(synthetic), "--onto", "synthetic-3way", "--from", "0.16", "--write")
    before = files_of(repo_bundle / "patches")
    code, doc = survey_json(capsys, tmp_path, *args)
    assert code == 16 and files_of(repo_bundle / "patches") == before
    h1 = next(p for p in doc["patches"] if p["hook"] == "H1")
    assert h1["class"] == "three_way" and "review" in h1["detail"]
    assert [c["commit"] for c in h1["hunks"][0]["culprits"]] == [nearby]
    code, doc = survey_json(capsys, tmp_path, *args, "--accept-three-way")
    assert code == 16  # the merged H1 does not fit 0.16.0, the line's other release
    assert files_of(repo_bundle / "patches") == before
    code, doc = survey_json(capsys, tmp_path, *args, "--accept-three-way", "--releases", "0.16.1")
    assert code == 0
    written = load_series(repo_bundle / "patches" / "core_v0.16")
    assert written.upstream["commit"] == nearby
    text = next(p for p in written.patches if "-H1-" in p.name).path.read_text()
    assert "attn_mask_type=self.attn_mask_type,  # mask" in text


def test_committed_manifests_record_the_current_overlay():
    """After an adapter edit, `mla-seam rebase --refresh-overlay` must have been run."""
    from mla_seam.overlay_refresh import refresh_overlay

    assert refresh_overlay(REPO / "patches", check=True) == []


def test_rebase_onto_a_ref_that_already_holds_the_series(synthetic, repo_bundle, capsys, tmp_path):
    """A fork that committed the applied series: every hook is upstream, the range-diff says so.

    git range-diff refuses the empty new range (``fatal: need two commit ranges``); the survey
    reports it instead of a traceback, and ``--write`` refuses with a RebaseError.
    """
    assert cli.main(["apply", str(synthetic)]) == 0
    capsys.readouterr()
    done = commit_all(synthetic, "fork: carry the mla-seam series")
    gitlayer.create_tag(gitlayer.open_repo(synthetic), "fork-done", done)
    code, doc = survey_json(
        capsys, tmp_path, "--megatron", str(synthetic), "--onto", "fork-done", "--from", "0.16"
    )
    assert code == 0
    assert set(classes(doc).values()) == {"upstream"}
    assert "the new series is empty" in doc["range_diff"]
    assert doc["range_diff"].count(" < -:  ------- mla-seam H") == len(doc["patches"])
    env = {"MLA_SEAM_ROOT": str(repo_bundle)}
    done = run_subprocess(
        env,
        "rebase",
        "--megatron",
        str(synthetic),
        "--onto",
        "fork-done",
        "--from",
        "0.16",
        "--write",
    )
    assert done.returncode == 16 and "no patch is left" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
