"""Fixtures more than one test module uses (all of them are here; shared helpers that are not
fixtures are in ``support.py``): upstream Megatron-LM checkouts; the synthetic bundle and
writable trees of the apply tests (``bundle``, ``make_tree``, ``seam_base``, ``seam_env``); the
six-release checkout, the bundle copy and the bare synthetic upstream of the rebase, drift,
partial-clone and nightly tests (``combo``, ``repo_bundle``, ``upstream_remote``). Tests marked
``slow`` are left out of the default run (``--run-slow`` runs them; ``.ci/run`` does).

Checkouts come from the mla-seam cache (``$MLA_SEAM_CACHE``, else the user's normal cache
``~/.cache/mla-seam``), so CI reuses downloaded sdists and built checkouts across runs. The only
network a test may need is the package registry, the first time a release is materialized.

Upstream's moving targets (main, dev) have no sdist: tests of the real ``patches/main`` and
``patches/dev`` need a git clone of NVIDIA/Megatron-LM named by ``$MLA_SEAM_UPSTREAM_CLONE``
(a clone or a bare mirror holding the commits those series record and the ``core_v*`` tags).
Without it they are skipped, saying so; CI has none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
from mla_seam import gitlayer, releases, upstream
from mla_seam.paths import cache_dir
from mla_seam.series import load_series
from support import (
    _MEMO,
    COMBO,
    REPO_ROOT,
    _template,
    _variant_template,
    copy_tree,
    make_bundle,
    synthetic_bundle,
)
from synthetic_upstream import Upstream, build_upstream

#: A git clone (or bare mirror) of NVIDIA/Megatron-LM for the tests of main and dev.
CLONE_ENV = "MLA_SEAM_UPSTREAM_CLONE"
REPO_ROOT = Path(__file__).resolve().parents[1]


#: Marker of the tests the default run leaves out (``--run-slow`` or ``-m slow`` runs them).
SLOW = "slow"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--run-slow``: also run the tests marked ``slow`` (``.ci/run`` does)."""
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (real-tree builds per release, kill trials, "
        "end-to-end nights); the default run leaves them out, .ci/run runs them",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Say which cache the upstream checkouts come from, which clone main and dev do, and
    whether the slow tests run."""
    origin = "MLA_SEAM_CACHE" if os.environ.get("MLA_SEAM_CACHE") else "default; MLA_SEAM_CACHE"
    clone = os.environ.get(CLONE_ENV) or f"none: main/dev tests skip ({CLONE_ENV} names one)"
    slow = "run" if _runs_slow(config) else "left out (--run-slow runs them)"
    return (
        f"mla-seam cache: {cache_dir()} ({origin} overrides)\nupstream clone: {clone}\n"
        f"slow tests: {slow}"
    )


def _runs_slow(config: pytest.Config) -> bool:
    return bool(config.getoption("--run-slow")) or SLOW in (config.option.markexpr or "")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Leave the ``slow`` tests out of the default run (deselected, counted by pytest), unless
    ``--run-slow``, a ``-m`` naming them, or the test's own node id was asked for."""
    if _runs_slow(config):
        return
    asked = [arg for arg in config.args if "::" in arg]  # node ids named on the command line

    def named(item: pytest.Item) -> bool:
        return any(item.nodeid == a or item.nodeid.startswith((a + "[", a + "::")) for a in asked)

    slow = [item for item in items if item.get_closest_marker(SLOW) and not named(item)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        left_out = set(slow)
        items[:] = [item for item in items if item not in left_out]


@pytest.fixture(scope="session", autouse=True)
def _no_upstream_url() -> Iterator[None]:
    """Tests never clone a real upstream: ignore a developer's ``$MLA_SEAM_UPSTREAM_URL``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(upstream.URL_ENV, raising=False)
        yield


@pytest.fixture(scope="session")
def seam_cache() -> Path:
    """The cache folder of this session, fixed at its start (tests may point the env elsewhere)."""
    return cache_dir()


def _assert_pristine(path: Path) -> None:
    repo = gitlayer.open_repo(path)
    assert repo is not None, f"cached checkout {path} is not a git work tree"
    dirty = gitlayer.dirty_paths(repo, ["."])
    assert not dirty, (
        f"cached checkout {path} was modified ({dirty[:5]}); it is read-only: use fresh_checkout "
        f"to get a writable clone, and delete {path} to rebuild it"
    )


@pytest.fixture(scope="session")
def megatron_checkout(seam_cache: Path) -> Iterator[Callable[[str], Path]]:
    """Factory ``(version) -> Path``: the cached, READ-ONLY checkout of a release.

    ``version`` may be a version, a tag or a line. Each release is materialized at most once per
    session; at the end of the session every checkout handed out must still be unmodified.
    """
    handed_out: Dict[str, Path] = {}

    def factory(version: str) -> Path:
        exact = upstream.version_for(version)
        if exact not in handed_out:
            path = upstream.get(exact, cache=seam_cache)
            _assert_pristine(path)
            handed_out[exact] = path
        return handed_out[exact]

    yield factory
    for path in handed_out.values():
        _assert_pristine(path)


@pytest.fixture(scope="session")
def fresh_checkout(seam_cache: Path) -> Callable[[str, Path], Path]:
    """Factory ``(version, dest) -> Path``: an independent, writable clone of a release at ``dest``.

    ``dest`` must not exist or be empty; it gets its own objects and no remote, so writes there
    never reach the cache. Returns ``dest``.
    """

    def factory(version: str, dest: Path) -> Path:
        return upstream.get(version, into=dest, cache=seam_cache)

    return factory


def recorded_commit(target: str) -> str:
    """The upstream commit the repository's ``patches/<target>`` series was made from."""
    return str(load_series(REPO_ROOT / "patches" / target).upstream["commit"])


@pytest.fixture(scope="session")
def upstream_clone() -> Path:
    """``$MLA_SEAM_UPSTREAM_CLONE``; the test is skipped (saying why) when it is not set."""
    path = os.environ.get(CLONE_ENV)
    if not path:
        pytest.skip(
            f"{CLONE_ENV} is not set: main and dev have no sdist, so the real patches/main and "
            "patches/dev are tested on a git clone of NVIDIA/Megatron-LM it names"
        )
    if not Path(path).is_dir():
        pytest.fail(f"{CLONE_ENV}={path} is not a directory")
    return Path(path)


@pytest.fixture(scope="session")
def target_checkout(upstream_clone: Path) -> Callable[..., Path]:
    """Factory ``(target, dest, back=0) -> Path``: a writable checkout of upstream's moving
    target (``main``, ``dev``) at the commit its series records, or ``back`` first-parent
    commits before it (a commit no manifest records), on a local branch named after the target.
    A ``git clone --shared`` of the clone: nothing is written there. Skips when the clone lacks
    the commit."""

    def factory(target: str, dest: Path, back: int = 0) -> Path:
        assert target in releases.MOVING_TARGETS, target
        repo = gitlayer.clone_shared(upstream_clone, dest)
        wanted = f"{recorded_commit(target)}~{back}"
        commit = gitlayer.resolve_commit(repo, wanted)
        if commit is None:
            pytest.skip(f"{upstream_clone} lacks {target}'s {wanted} (git fetch it there)")
        gitlayer.checkout_branch(repo, target, commit)
        return dest

    return factory


# --- the rebase, drift, partial-clone and nightly tests ---------------------------------------


@pytest.fixture(scope="session")
def combo(tmp_path_factory: pytest.TempPathFactory, seam_cache: Path) -> Path:
    """READ-ONLY checkout with the tags of :data:`COMBO`, HEAD at the last (rebase never writes)."""
    dest = tmp_path_factory.mktemp("combo") / "megatron"
    return upstream.get_many(list(COMBO), dest, cache=seam_cache)


@pytest.fixture
def repo_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bundle copy that mla-seam uses for this test (``MLA_SEAM_ROOT``)."""
    root = make_bundle(tmp_path / "bundle")
    monkeypatch.setenv("MLA_SEAM_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def upstream_remote(tmp_path_factory, fresh_checkout) -> Upstream:
    """The bare upstream of :mod:`synthetic_upstream` (built once per session)."""
    return build_upstream(tmp_path_factory.mktemp("upstream"), fresh_checkout)


# --- the apply tests: the synthetic bundle and writable trees -----------------------------------


@pytest.fixture(scope="session")
def seam_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One session folder for templates and the bundle, shared by every test module."""
    if "base" not in _MEMO:
        _MEMO["base"] = tmp_path_factory.mktemp("seam")
    return _MEMO["base"]


@pytest.fixture(scope="session")
def bundle(fresh_checkout: Callable[[str, Path], Path], seam_base: Path) -> Path:
    """The synthetic bundle (MLA_SEAM_ROOT layout)."""
    return synthetic_bundle(fresh_checkout, seam_base)


@pytest.fixture
def seam_env(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, str]:
    """Environment for CLI subprocesses (and this process) pointing at the synthetic bundle."""
    monkeypatch.setenv("MLA_SEAM_ROOT", str(bundle))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "scripts"), env.get("PYTHONPATH")])
    )
    env["MLA_SEAM_PYTHON"] = sys.executable
    for name in ("MLA_SEAM_CRASH_AT", "MLA_SEAM_CRASH_SIGNAL"):
        env.pop(name, None)
    return env


@pytest.fixture
def make_tree(
    fresh_checkout: Callable[[str, Path], Path], seam_base: Path, tmp_path: Path
) -> Callable[..., Path]:
    """Factory ``(version, git=True, name=...) -> Path``: a writable tree of a release.

    ``version`` "0.16.0" is the synthetic variant (MLA moved by a few lines).
    """

    def factory(version: str, git: bool = True, name: Optional[str] = None) -> Path:
        if version == "0.16.0":
            template = _variant_template(fresh_checkout, seam_base)
        else:
            template = _template(fresh_checkout, version, seam_base)
        dest = tmp_path / (name or f"tree-{version}-{'git' if git else 'plain'}")
        return copy_tree(template, dest, with_git=git)

    return factory
