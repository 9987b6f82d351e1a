"""``mla-seam upstream``: version map, materialized checkouts, clones, cache behaviour, CLI.

Real git and real pip throughout. The only network used is the package registry, the first time a
release is downloaded into the session cache; every other cache here is a tmp folder seeded with
a copy of the session's sdist.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from mla_seam import gitlayer, upstream
from mla_seam.cli import main
from mla_seam.errors import UpstreamError

# Commit ids of materialized releases: the same on every machine (fixed identity, date, message).
# A change here means every user's cached checkout changes id: do it only on purpose.
EXPECTED_COMMIT = {
    "0.16.1": "9e9be6c284fe14e6f77b4581fca794f7c0314deb",
    "0.19.2": "064bac614dbfaccb5993371598a0ce2a16cacd7b",
}


def _package_version(checkout: Path) -> str:
    text = (checkout / "megatron/core/package_info.py").read_text(encoding="utf-8")
    fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH) = (\d+)", text, flags=re.MULTILINE))
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}"


def _repo(path: Path):
    repo = gitlayer.open_repo(path)
    assert repo is not None, f"{path} is not a git work tree"
    return repo


def _seeded_cache(root: Path, seam_cache: Path, *versions: str) -> Path:
    """A cache folder given copies of the session's sdists for ``versions`` (no download)."""
    (root / "sdists").mkdir(parents=True, exist_ok=True)
    for version in versions:
        shutil.copy2(upstream.fetch_sdist(version, cache=seam_cache), root / "sdists")
    return root


# --- version <-> tag map -------------------------------------------------------------------------


def test_version_map() -> None:
    assert upstream.RELEASES[0] == "0.13.0" and upstream.RELEASES[-1] == "0.19.2"
    assert len(upstream.RELEASES) == 15 and "0.18.1" not in upstream.RELEASES
    assert upstream.lines() == ["0.13", "0.14", "0.15", "0.16", "0.17", "0.18", "0.19"]
    assert upstream.tag_for("0.16.1") == "core_v0.16.1"
    assert upstream.version_for("core_v0.16.1") == "0.16.1"
    assert upstream.version_for("0.16") == "0.16.1"
    assert upstream.version_for("core_v0.15") == "0.15.3"
    assert upstream.tag_for("0.18") == "core_v0.18.2"
    assert upstream.line_of("0.19.2") == "0.19"
    assert upstream.newest_in_line("0.13") == "0.13.1"


@pytest.mark.parametrize("ref", ["core_v0.12.0", "0.18.1", "0.20", "main", "core_r0.16.0", ""])
def test_unknown_ref_names_known_lines(
    ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty cache: a package-index refresh recorded in the user's cache (PyPI lists the
    # yanked 0.18.1) would make 0.18.1 a known release, as an exact pin of it is.
    monkeypatch.setenv("MLA_SEAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UpstreamError) as info:
        upstream.version_for(ref)
    assert "0.13" in str(info.value) and "0.19 (0.19.0, 0.19.2)" in str(info.value)


# --- materialized checkouts ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.16.1", "0.19.2"])
def test_materialized_release(megatron_checkout: Callable[[str], Path], version: str) -> None:
    checkout = megatron_checkout(version)
    repo = _repo(checkout)
    head = gitlayer.head_commit(repo)
    assert gitlayer.tag_commit(repo, f"core_v{version}") == head
    assert _package_version(checkout) == version
    assert (checkout / "megatron/core/transformer/multi_latent_attention.py").is_file()
    assert not (checkout / "PKG-INFO").exists()
    assert not list(checkout.glob("*.egg-info"))
    assert not gitlayer.dirty_paths(repo, ["."])
    if upstream.cached_source(version, cache=checkout.parents[1])["source"] == "sdist":
        assert head == EXPECTED_COMMIT[version]
        assert len(list(repo.iter_commits())) == 1  # a root commit


def test_commit_id_reproducible(
    tmp_path: Path, seam_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for name in ("plain", "hostile"):
        cache = _seeded_cache(tmp_path / name, seam_cache, "0.16.1")
        monkeypatch.setenv("MLA_SEAM_CACHE", str(cache))
        if name == "hostile":  # user git config and umask must not leak into the commit
            config = tmp_path / "gitconfig"
            config.write_text(
                "[user]\n\tname = Someone Else\n\temail = else@example.com\n"
                "[core]\n\tautocrlf = true\n\tfileMode = false\n"
                "[init]\n\tdefaultBranch = trunk\n[commit]\n\tgpgSign = true\n",
                encoding="utf-8",
            )
            monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
            monkeypatch.setenv("TZ", "Asia/Kolkata")
        old_umask = os.umask(0o077 if name == "hostile" else 0o022)
        try:
            checkout = upstream.get("core_v0.16.1")
        finally:
            os.umask(old_umask)
        assert checkout == cache / "checkouts" / "core_v0.16.1"
        ids.append(gitlayer.head_commit(_repo(checkout)))
    assert ids[0] == ids[1] == EXPECTED_COMMIT["0.16.1"]


# --- clones --------------------------------------------------------------------------------------


def test_into_gives_independent_clone(
    megatron_checkout: Callable[[str], Path],
    fresh_checkout: Callable[[str, Path], Path],
    tmp_path: Path,
) -> None:
    cached = megatron_checkout("0.16.1")
    cached_head = gitlayer.head_commit(_repo(cached))
    info_file = "megatron/core/package_info.py"
    original = (cached / info_file).read_bytes()

    dest = tmp_path / "clone"
    assert fresh_checkout("0.16.1", dest) == dest
    clone = _repo(dest)
    assert gitlayer.head_commit(clone) == gitlayer.tag_commit(clone, "core_v0.16.1") == cached_head
    assert clone.active_branch.name == "main"
    assert not clone.remotes
    objects = gitlayer.git_dir(clone) / "objects"
    assert not (objects / "info" / "alternates").exists()
    assert all(p.stat().st_nlink == 1 for p in objects.rglob("*") if p.is_file())

    (dest / info_file).write_bytes(original + b"# local edit\n")
    gitlayer.commit_all(clone, "local edit", "2030-01-01T00:00:00+00:00")
    gitlayer.create_tag(clone, "core_v0.16.1-edited")
    cached_repo = _repo(cached)
    assert gitlayer.head_commit(cached_repo) == cached_head
    assert (cached / info_file).read_bytes() == original
    assert gitlayer.tag_commit(cached_repo, "core_v0.16.1-edited") is None


def test_get_many_holds_both_tags(seam_cache: Path, tmp_path: Path) -> None:
    dest = upstream.get_many(["0.16.1", "core_v0.19.2"], tmp_path / "both", cache=seam_cache)
    repo = _repo(dest)
    tags = gitlayer.tags_at(repo)
    assert {"core_v0.16.1", "core_v0.19.2"} <= set(tags)
    assert gitlayer.head_commit(repo) == tags["core_v0.19.2"]
    assert repo.active_branch.name == "main"
    assert _package_version(dest) == "0.19.2"
    assert repo.git.rev_list("--count", "core_v0.16.1..core_v0.19.2") == "1"
    changed = repo.git.diff("--name-only", "core_v0.16.1", "core_v0.19.2").splitlines()
    assert "megatron/core/package_info.py" in changed


# --- sources and cache behaviour -----------------------------------------------------------------


def test_unreachable_url_falls_back_to_sdist(
    tmp_path: Path, seam_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _seeded_cache(tmp_path / "cache", seam_cache, "0.16.1")
    url = (tmp_path / "no-such-mirror.git").as_uri()
    with caplog.at_level(logging.WARNING, logger="mla_seam.upstream"):
        checkout = upstream.get("0.16.1", url=url, cache=cache)
    assert "building it from the PyPI sdist" in caplog.text
    assert upstream.cached_source("0.16.1", cache=cache)["source"] == "sdist"
    assert gitlayer.head_commit(_repo(checkout)) == EXPECTED_COMMIT["0.16.1"]


def test_reachable_url_is_cloned(
    megatron_checkout: Callable[[str], Path],
    seam_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror = megatron_checkout("0.16.1")  # a git repository carrying the tag, as upstream does
    monkeypatch.setenv(upstream.URL_ENV, mirror.as_uri())
    cache = tmp_path / "cache"
    checkout = upstream.get("core_v0.16.1", cache=cache)
    source = upstream.cached_source("0.16.1", cache=cache)
    assert source["source"] == "git" and source["url"] == mirror.as_uri()
    repo = _repo(checkout)
    assert gitlayer.tag_commit(repo, "core_v0.16.1") == gitlayer.head_commit(_repo(mirror))
    assert not (cache / "sdists").exists()  # the registry was not asked

    # The mirror has no core_v0.19.2: that one falls back to its sdist. Combining the shallow
    # git clone with the sdist-built release still gives both tags.
    _seeded_cache(cache, seam_cache, "0.19.2")
    both = _repo(upstream.get_many(["0.16.1", "0.19.2"], tmp_path / "both", cache=cache))
    assert upstream.cached_source("0.19.2", cache=cache)["source"] == "sdist"
    assert set(gitlayer.tags_at(both)) == {"core_v0.16.1", "core_v0.19.2"}
    assert gitlayer.head_commit(both) == EXPECTED_COMMIT["0.19.2"]


def test_half_built_entry_is_never_used(tmp_path: Path, seam_cache: Path) -> None:
    cache = _seeded_cache(tmp_path / "cache", seam_cache, "0.16.1")
    stale = cache / "checkouts" / ".tmp-core_v0.16.1-dead"
    (stale / "megatron").mkdir(parents=True)
    checkout = upstream.get("0.16.1", cache=cache)
    assert gitlayer.head_commit(_repo(checkout)) == EXPECTED_COMMIT["0.16.1"]
    assert sorted(p.name for p in (cache / "checkouts").iterdir()) == ["core_v0.16.1"]


def test_concurrent_builders_share_one_entry(tmp_path: Path, seam_cache: Path) -> None:
    cache = _seeded_cache(tmp_path / "cache", seam_cache, "0.16.1")
    env = {**os.environ, "MLA_SEAM_CACHE": str(cache)}
    code = "from mla_seam import upstream; print(upstream.get('0.16.1'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert outputs == [str(cache / "checkouts" / "core_v0.16.1")] * 3
    assert sorted(p.name for p in (cache / "checkouts").iterdir()) == ["core_v0.16.1"]


def test_corrupt_sdist_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "sdists").mkdir(parents=True)
    (cache / "sdists" / "megatron_core-0.16.1.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(UpstreamError, match="sha256"):
        upstream.get("0.16.1", cache=cache)
    assert not (cache / "checkouts" / "core_v0.16.1").exists()


def test_unreachable_registry_says_how_to_preseed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no index and no local sdists: offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    cache = tmp_path / "cache"
    with pytest.raises(UpstreamError) as info:
        upstream.get("0.13.0", cache=cache)
    assert "unreachable" in info.value.message
    assert "MLA_SEAM_CACHE" in info.value.hint and "pre-seed" in info.value.hint
    assert not list((cache / "sdists").iterdir())
    assert not list((cache / "checkouts").iterdir())  # nothing half-built left behind


# --- command line --------------------------------------------------------------------------------


def test_cli_get_prints_path(
    megatron_checkout: Callable[[str], Path],
    seam_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLA_SEAM_CACHE", str(seam_cache))
    assert main(["upstream", "get", "0.16"]) == 0
    assert capsys.readouterr().out == f"{megatron_checkout('0.16.1').resolve()}\n"
    assert main(["upstream", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(upstream.RELEASES)
    assert any(
        row.startswith("0.16.1") and "core_v0.16.1" in row and "cached" in row for row in rows
    )


def test_cli_unknown_tag_exits_15(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UpstreamError, match="known lines"):
        upstream.get("core_v0.12.0")
    assert main(["upstream", "get", "core_v0.12.0"]) == 15
    assert capsys.readouterr().out == ""


def test_cli_into_non_empty_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine\n", encoding="utf-8")
    assert main(["upstream", "get", "0.16.1", "--into", str(dest)]) == 2
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert main(["upstream", "get", "0.16.1", "0.19.2"]) == 2  # several releases need --into
    assert capsys.readouterr().out == ""


def test_cli_bad_url_is_an_error_never_a_silent_sdist(
    tmp_path: Path, seam_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """``--url`` named on the command line: a clone that fails is exit 15 (nothing from PyPI);
    a release already cached from elsewhere says that the URL was not used."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLA_SEAM_CACHE", str(cache))
    bad = (tmp_path / "no-such-mirror.git").as_uri()
    assert main(["upstream", "get", "0.16.1", "--url", bad]) == 15
    assert "could not clone core_v0.16.1" in caplog.text and "nothing was fetched" in caplog.text
    assert not (cache / "sdists").exists() and not upstream.checkout_path("0.16.1", cache).exists()
    _seeded_cache(cache, seam_cache, "0.16.1")
    upstream.get("0.16.1", cache=cache)  # cached from the sdist
    caplog.clear()
    assert main(["upstream", "get", "0.16.1", "--url", bad]) == 0
    assert "--url " + bad + " was not used" in caplog.text


def test_cli_url_ref_checks_out_a_branch(
    megatron_checkout: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    """With --url and --into, REF may be a branch or commit of that repository (GPU staging)."""
    mirror = megatron_checkout("0.16.1")
    into = tmp_path / "main"
    assert main(["upstream", "get", "main", "--url", mirror.as_uri(), "--into", str(into)]) == 0
    assert gitlayer.head_commit(_repo(into)) == gitlayer.head_commit(_repo(mirror))
    assert (
        main(["upstream", "get", "nope", "--url", mirror.as_uri(), "--into", str(tmp_path / "x")])
        == 15
    )
    assert not (tmp_path / "x").exists()
