"""Every verb on clones as CI makes them: blobless, treeless and shallow, with real git.

A local bare "upstream" (:func:`build_upstream`) stands in for NVIDIA/Megatron-LM: the 0.19.2
release (built from its PyPI sdist, tagged ``core_v0.19.2``), then upstream commits that move
three hooks of the core_v0.19 series (H4 moved down: offset; a context line of H3 edited two
lines away from it: a clean 3-way merge; the line H7 sits under rewritten: a conflict), the
release ``core_v0.20.0``, and ``main`` after it (the H7 change reverted, version 0.21.0); and a
``dev`` branch from 0.19.2 that says 0.19.0 and rewrites the line H7 sits under (a conflict,
one culprit). The bare repository serves filters and fetches by id as GitHub does; the clones
are made from it with ``git clone --filter=...`` / ``--depth``. Shared with ``test_nightly``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict

import pytest
from mla_seam import gitlayer
from test_rebase import TC, TL, bundle, edit, run, run_subprocess  # noqa: F401

LM = "megatron/core/models/common/language_module/language_module.py"
PACKAGE_INFO = "megatron/core/package_info.py"
SPARSE = [PACKAGE_INFO]  # what the nightly workflow checks out of its clone
#: The date of the synthetic upstream commits (a hook ported onto them gets it as Last-Update).
UPSTREAM_DATE = "2026-12-01T12:00:00+00:00"


def commit_all(tree: Path, message: str) -> str:
    """Commit every change in ``tree`` as an upstream commit of :data:`UPSTREAM_DATE`."""
    return gitlayer.commit_all(gitlayer.open_repo(tree), message, UPSTREAM_DATE)


@dataclasses.dataclass
class Upstream:
    """The bare upstream and the commits the tests name."""

    bare: Path
    url: str
    commits: Dict[str, str]


def _set_version(tree: Path, minor: int) -> None:
    edit(tree / PACKAGE_INFO, "MINOR = 19\nPATCH = 2\n", f"MINOR = {minor}\nPATCH = 0\n")


def build_upstream(root: Path, fresh_checkout: Callable[[str, Path], Path]) -> Upstream:
    """The bare upstream described in the module doc, at ``root / "upstream.git"``."""
    work = fresh_checkout("0.19.2", root / "work")
    commits = {"core_v0.19.2": gitlayer.head_commit(gitlayer.open_repo(work)) or ""}
    text = (work / TC).read_text()
    first, rest = text.split("\n", 1)
    (work / TC).write_text(
        f"{first}\n# upstream: three new lines\n# above MLATransformerConfig\n#\n{rest}"
    )
    commits["offset"] = commit_all(work, "upstream: a comment block at the top of the config")
    edit(
        work / LM,
        "attn_type: AttnBackend\n        ) -> None:\n",
        "attn_type: AttnBackend\n        ) -> None:  # upstream: typed\n",
    )
    commits["three_way"] = commit_all(work, "upstream: annotate the backend check")
    pp_old = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank()\n"
    pp_new = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank(check=True)\n"
    edit(work / TL, pp_old, pp_new)
    commits["conflict"] = commit_all(work, "upstream: check the pipeline rank")
    _set_version(work, 20)
    commits["core_v0.20.0"] = commit_all(work, "upstream: release 0.20.0")
    repo = gitlayer.open_repo(work)
    gitlayer.create_tag(repo, "core_v0.20.0", commits["core_v0.20.0"])
    edit(work / TL, pp_new, pp_old)
    commits["revert"] = commit_all(work, "upstream: revert the pipeline rank check")
    edit(work / PACKAGE_INFO, "MINOR = 20\n", "MINOR = 21\n")
    commits["main"] = commit_all(work, "upstream: main is 0.21.0")
    gitlayer.checkout_branch(repo, "dev", commits["core_v0.19.2"])
    pp_dev = "        pp_rank = parallel_state.get_pipeline_model_parallel_rank(dev=1)\n"
    edit(work / TL, pp_old, pp_dev)
    edit(work / PACKAGE_INFO, "PATCH = 2\n", "PATCH = 0\n")
    commits["dev"] = commit_all(work, "dev: the pipeline rank of dev (says 0.19.0)")
    bare = root / "upstream.git"
    gitlayer.init_bare(bare)
    repo.git.push("--quiet", str(bare), "main:refs/heads/main", "dev:refs/heads/dev", "--tags")
    return Upstream(bare, bare.as_uri(), commits)


@pytest.fixture(scope="module")
def upstream_remote(tmp_path_factory, fresh_checkout) -> Upstream:
    """The bare upstream of the module doc (built once per test module)."""
    return build_upstream(tmp_path_factory.mktemp("upstream"), fresh_checkout)


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


def test_unreachable_promisor_is_exit_23_with_the_command(upstream_remote, tmp_path, bundle):
    """The clone's remote is gone: exit 23, the message says what to fetch; no traceback."""
    clone = _clone(upstream_remote, tmp_path / "blobless", filter_spec="blob:none")
    repo = gitlayer.open_repo(clone)
    repo.git.remote("set-url", "origin", str(tmp_path / "gone.git"))
    done = run_subprocess(
        {"MLA_SEAM_ROOT": str(bundle)}, "rebase", "--megatron", str(clone), "--onto", "main"
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
