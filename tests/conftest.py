"""Session fixtures shared by the test suite: upstream Megatron-LM checkouts.

Checkouts come from the mla-seam cache (``$MLA_SEAM_CACHE``, else the user's normal cache
``~/.cache/mla-seam``), so CI reuses downloaded sdists and built checkouts across runs. The only
network a test may need is the package registry, the first time a release is materialized.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterator

import pytest
from mla_seam import gitlayer, upstream
from mla_seam.paths import cache_dir


def pytest_report_header(config: pytest.Config) -> str:
    """Say which cache the upstream checkouts come from."""
    origin = "MLA_SEAM_CACHE" if os.environ.get("MLA_SEAM_CACHE") else "default; MLA_SEAM_CACHE"
    return f"mla-seam cache: {cache_dir()} ({origin} overrides)"


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
