"""The adapter inside every supported release line: apply the real series, then run tests/adapter.

Each line gets a fresh checkout built from its PyPI sdist, the product's own ``mla-seam apply``,
and a separate pytest process over ``tests/adapter`` with that tree on ``sys.path`` (one Megatron
per interpreter). A failure shows the inner run's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from packaging.version import Version

from mla_seam import cli, series

ROOT = Path(__file__).resolve().parents[1]
#: The newest release of every line that has a series.
RELEASES = [
    max(series.load_series(folder).releases, key=Version)
    for folder in sorted((ROOT / "patches").iterdir())
    if (folder / series.MANIFEST_NAME).is_file()
]


@pytest.mark.parametrize("release", RELEASES)
def test_adapter_suite_in_patched_release(release, fresh_checkout, tmp_path):
    tree = fresh_checkout(release, tmp_path / f"megatron-{release}")
    assert cli.main(["apply", str(tree)]) == 0
    report = tmp_path / "report.json"
    env = dict(os.environ, MLA_SEAM_MEGATRON_TREE=str(tree), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "tests" / "adapter"),
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            "-o",
            f"junit_suite_name=adapter-{release}",
            f"--junitxml={report}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, f"adapter tests failed on {release}:\n{tail}"
    assert " passed" in result.stdout, tail
    sys.stdout.write(f"\n[{release}] {result.stdout.splitlines()[-1]}\n")
