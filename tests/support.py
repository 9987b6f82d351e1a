"""Helpers the CPU test modules share that are not fixtures (those are in conftest.py)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import pytest
from packaging.version import Version

#: The marker of tests the default run leaves out (conftest.py; ``--run-slow`` runs them).
slow = pytest.mark.slow


def newest_fast(
    values: Iterable[Any],
    version: Callable[[Any], str] = str,
    ids: Optional[Callable[[Any], str]] = None,
) -> List[Any]:
    """``pytest.param`` per value: the newest release in the default run, every other marked
    ``slow`` (same test on each release line: the newest stands for them until ``--run-slow``).

    Args:
        values: The parameters (a release, or a tuple holding one).
        version: The release of a value.
        ids: The test id of a value (default pytest's).
    """
    values = list(values)
    newest = max((version(v) for v in values), key=Version, default=None)
    return [
        pytest.param(
            *(v if isinstance(v, tuple) else (v,)),
            marks=() if version(v) == newest else slow,
            id=ids(v) if ids else None,
        )
        for v in values
    ]
