"""The adapter inside every supported release line: apply the real series, then run tests/adapter.

Each line gets a fresh checkout built from its PyPI sdist, the product's own ``mla-seam apply``,
and a separate pytest process over ``tests/adapter`` with that tree on ``sys.path`` (one Megatron
per interpreter). A failure shows the inner run's output. The vanilla checkout of each line runs
upstream's pipeline offsets (``tests/adapter/pipeline_offsets.py``) to show what H7 absorbs.

Upstream's moving targets (main, dev) have no sdist: their patched trees come from the git
clone ``$MLA_SEAM_UPSTREAM_CLONE`` names (at the commit each series records); without one those
cases are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from packaging.version import Version

from mla_seam import cli, releases, series
from support import newest_fast

ROOT = Path(__file__).resolve().parents[1]
OFFSETS_SCRIPT = ROOT / "tests" / "adapter" / "pipeline_offsets.py"
#: The newest release of every release line that has a series (main and dev: below).
RELEASES = [
    max(series.load_series(folder).releases, key=Version)
    for folder in sorted((ROOT / "patches").iterdir())
    if (folder / series.MANIFEST_NAME).is_file() and folder.name not in releases.MOVING_TARGETS
]
#: Upstream's moving targets that have a series.
TARGETS = [t for t in releases.MOVING_TARGETS if (ROOT / "patches" / t).is_dir()]


@pytest.mark.parametrize("release", newest_fast(RELEASES))
def test_adapter_suite_in_patched_release(release, fresh_checkout, tmp_path):
    tree = fresh_checkout(release, tmp_path / f"megatron-{release}")
    assert cli.main(["apply", str(tree)]) == 0
    _adapter_suite(tree, release, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
def test_adapter_suite_in_patched_moving_target(target, target_checkout, tmp_path, capsys):
    """main and dev at the commits their series record ($MLA_SEAM_UPSTREAM_CLONE), patched with
    no flags: the content picks the target's series."""
    tree = target_checkout(target, tmp_path / f"megatron-{target}")
    assert cli.main(["apply", str(tree)]) == 0
    assert f"applied {target} " in capsys.readouterr().out
    _adapter_suite(tree, target, tmp_path)


def _adapter_suite(tree: Path, release: str, tmp_path: Path) -> None:
    """tests/adapter in a pytest process of its own with ``tree`` first on sys.path."""
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


def _offsets_module():
    spec = importlib.util.spec_from_file_location("pipeline_offsets", OFFSETS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("release", newest_fast(RELEASES))
def test_vanilla_release_divides_by_zero_without_a_middle_stage(release, megatron_checkout):
    """Upstream's own offsets (no series): PP=2 + VPP=2 with first 4 and last 2 layers raises
    ZeroDivisionError on pipeline rank 1 for every model, which H7 answers for MLA models;
    PP=4 with middle stages is right; 0.13.x miscounts a split with only the last stage set."""
    _vanilla_offsets(megatron_checkout(release), release)


@pytest.mark.parametrize("target", TARGETS)
def test_vanilla_moving_target_divides_by_zero_without_a_middle_stage(
    target, target_checkout, tmp_path
):
    """main and dev (no series applied) count as every release does: H7 is still needed."""
    _vanilla_offsets(target_checkout(target, tmp_path / f"vanilla-{target}"), target)


def _vanilla_offsets(tree: Path, release: str) -> None:
    expected = _offsets_module().EXPECTED
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(OFFSETS_SCRIPT), str(tree)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout.splitlines()[-1])
    for model in ("mla", "gpt"):
        zero_middle = doc[f"pp2-vpp2-first4-last2/{model}"]
        assert {k: zero_middle[k] for k in ("0,0", "0,1")} == {"0,0": 0, "0,1": 3}
        assert zero_middle["1,0"].startswith("ZeroDivisionError"), zero_middle
        assert zero_middle["1,1"].startswith("ZeroDivisionError"), zero_middle
        for name in ("pp4-vpp2-first2-last2", "pp4-vpp2-last2"):
            want = {f"{r},{s}": offset for (r, s), offset in expected[name].items()}
            miscounts = name == "pp4-vpp2-last2" and release.startswith("0.13.")
            assert (doc[f"{name}/{model}"] == want) != miscounts, (name, doc[f"{name}/{model}"])
