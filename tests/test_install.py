"""A normal install, and trees applied by an older mla-seam.

* A wheel built from the repository (``pip wheel --no-deps``) installed into a fresh venv:
  apply, status and revert on a materialized release with the installed command only (no
  checkout of this repository on any path), the GPU tests found in the installed bundle, and a
  missing bundle refused (exit 20) before anything is materialized.
* mla-seam 0.1.0 (this repository at commit 20c7d69, run from ``git archive``) applies a tree;
  the current mla-seam recognises it, upgrades it and reverts it. A bundle whose adapter
  differs from 0.1.0's exercises the upgrade path whatever the current adapter's bytes are.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from mla_seam import earlier_versions
from mla_seam.errors import BundleError
from mla_seam.paths import ADAPTER_RELPATH
from support import REPO_ROOT, copy_tree, snapshot, tree_hash

OLD = "20c7d69"  # the 0.1.0 bundle
RELEASE = "0.16.1"


# --- a wheel in a fresh venv ---------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; dependencies reached through a .pth line."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for rel in ("pyproject.toml", "README.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, src / rel)
    for rel in ("scripts/mla_seam", "patches", "overlay", "tests/gpu"):
        shutil.copytree(
            REPO_ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    wheels = base / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("mla_seam-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # GitPython, rich and packaging from the test interpreter's site-packages (no network).
    (Path(purelib) / "_mla_seam_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _installed_env() -> Dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "MLA_SEAM_ROOT", "VIRTUAL_ENV")
        and not k.startswith("MLA_SEAM_CRASH")
    }


def _run(cmd: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_installed_env(), capture_output=True, text=True, timeout=300
    )


def test_wheel_carries_the_bundle_and_every_verb_works(
    installed: Path, fresh_checkout: Callable[[str, Path], Path], tmp_path: Path
) -> None:
    python, command = installed / "bin" / "python", installed / "bin" / "mla-seam"
    where = _run(
        [str(python), "-c", "import mla_seam, mla_seam.paths as p; "
         "print(mla_seam.__file__); print(p.bundle_root()); print(p.gpu_tests_dir())"],
        tmp_path,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert line.startswith(str(installed)), f"not from the installed package: {line}"
    assert (Path(where.stdout.splitlines()[2]) / "test_smoke.py").is_file()
    bundle = Path(where.stdout.splitlines()[1])
    for line in sorted(p for p in (REPO_ROOT / "patches").iterdir() if p.is_dir()):
        shipped = sorted(p.name for p in (bundle / "patches" / line.name).iterdir())
        assert shipped == sorted(p.name for p in line.iterdir()), line.name
        assert not [n for n in shipped if n not in ("series", "manifest.json")
                    and not n.endswith(".patch")], f"{line.name}: only our own files ship"  # fmt: skip
    tree = fresh_checkout(RELEASE, tmp_path / "tree")
    before = snapshot(tree)
    done = _run([str(command), "apply", str(tree)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tree / ADAPTER_RELPATH).read_bytes() == (
        REPO_ROOT / "overlay" / ADAPTER_RELPATH
    ).read_bytes()
    status = _run([str(command), "apply", "--status", str(tree)], tmp_path)
    assert status.returncode == 0 and status.stdout.startswith("applied"), status.stdout
    quiet = _run([str(command), "apply", "--status", str(tree), "-q"], tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout
    listed = _run([str(command), "upstream", "list", "--json"], tmp_path)
    assert listed.returncode == 0 and any(
        r["version"] == RELEASE for r in json.loads(listed.stdout)
    )
    undo = _run([str(command), "apply", "--revert", str(tree)], tmp_path)
    assert undo.returncode == 0, undo.stderr
    assert snapshot(tree) == before


def test_missing_bundle_is_refused_before_any_side_effect(installed: Path, tmp_path: Path) -> None:
    broken = tmp_path / "venv"
    shutil.copytree(installed, broken, symlinks=True)
    for bundle in broken.rglob("mla_seam/_bundle"):
        shutil.rmtree(bundle)
    cwd = tmp_path / "job"
    cwd.mkdir()
    # The console script's shebang names the original venv: run the copy's module instead.
    done = _run([str(broken / "bin" / "python"), "-m", "mla_seam", "apply"], cwd)
    assert done.returncode == BundleError.exit_code, done.stdout + done.stderr
    assert "bundle is missing" in done.stderr and "Traceback" not in done.stderr
    assert list(cwd.iterdir()) == [], "a release was materialized before the bundle check"


# --- trees applied by mla-seam 0.1.0 ---------------------------------------------------------


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This repository at 0.1.0 (``git archive``): its code and its bundle."""
    found = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True
    )
    if found.returncode != 0:
        pytest.skip(f"commit {OLD} (mla-seam 0.1.0) is not in this clone's history (shallow?)")
    dest = tmp_path_factory.mktemp("mla-seam-0.1.0")
    data = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", OLD],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest)
    return dest


def _old_apply(old: Path, tree: Path) -> None:
    env = {**_installed_env(), "PYTHONPATH": str(old / "scripts"), "MLA_SEAM_ROOT": str(old)}
    done = subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", str(tree)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = tree / ".git" / "mla-seam" if (tree / ".git").exists() else tree / ".mla-seam"
    assert json.loads((state / "state.json").read_text())["tool"] == "mla-seam 0.1.0"


def _now(*args: str, root: Optional[Path] = None) -> subprocess.CompletedProcess:
    env = {**_installed_env(), "PYTHONPATH": str(REPO_ROOT / "scripts")}
    if root is not None:
        env["MLA_SEAM_ROOT"] = str(root)
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _newer_bundle(tmp: Path) -> Path:
    """The current bundle with an adapter that differs from 0.1.0's (manifests updated)."""
    root = tmp / "newer"
    shutil.copytree(REPO_ROOT / "patches", root / "patches")
    shutil.copytree(REPO_ROOT / "overlay", root / "overlay")
    adapter = root / "overlay" / ADAPTER_RELPATH
    adapter.write_bytes(adapter.read_bytes() + b"# a newer mla-seam's adapter\n")
    blob = subprocess.run(
        ["git", "hash-object", str(adapter)], capture_output=True, text=True, check=True
    ).stdout.strip()
    for manifest in (root / "patches").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["overlay"] = {ADAPTER_RELPATH: blob}
        manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return root


def test_released_data_matches_the_0_1_0_bundle(old_bundle: Path) -> None:
    assert earlier_versions.snapshot(old_bundle) == earlier_versions.releases()["0.1.0"]


@pytest.mark.parametrize("git", [True, False], ids=["git", "plain"])
@pytest.mark.parametrize("bundle", ["current", "newer-adapter"])
def test_tree_applied_by_0_1_0_is_recognised_upgraded_and_reverted(
    git: bool,
    bundle: str,
    old_bundle: Path,
    fresh_checkout: Callable[[str, Path], Path],
    tmp_path: Path,
) -> None:
    root = _newer_bundle(tmp_path) if bundle == "newer-adapter" else None
    source = fresh_checkout(RELEASE, tmp_path / "source")
    tree = copy_tree(source, tmp_path / "tree", with_git=git)
    before = snapshot(tree)
    _old_apply(old_bundle, tree)
    current_is_old = earlier_versions.snapshot(REPO_ROOT) == earlier_versions.releases()["0.1.0"]
    status = _now("--status", str(tree), root=root)
    assert status.returncode == 0, status.stdout + status.stderr
    headline = status.stdout.splitlines()[0]
    if root is None and current_is_old:
        assert headline == "applied"
    else:
        assert headline.startswith("applied by mla-seam 0.1.0"), status.stdout
        assert "NOT ours" not in status.stdout and "changed after apply" not in status.stdout
    upgraded = copy_tree(tree, tmp_path / "upgraded", with_git=git)
    done = _now(str(upgraded), root=root)
    assert done.returncode == 0, done.stdout + done.stderr
    again = _now("--status", str(upgraded), root=root)
    assert again.stdout.splitlines()[0] == "applied", again.stdout
    want = (root or REPO_ROOT) / "overlay" / ADAPTER_RELPATH
    assert (upgraded / ADAPTER_RELPATH).read_bytes() == want.read_bytes()
    assert _now("--revert", str(upgraded), root=root).returncode == 0
    assert tree_hash(upgraded) == before[0], "revert after upgrade is not byte-exact"
    undo = _now("--revert", str(tree), root=root)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert snapshot(tree) == before, "revert of a 0.1.0 tree is not byte-exact"


def test_every_package_of_the_tooling_is_in_the_wheel() -> None:
    """pyproject lists the packages by hand (the bundle is mapped in): none may be left out."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    listed = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    scripts = REPO_ROOT / "scripts"
    found = {
        ".".join(init.parent.relative_to(scripts).parts)
        for init in scripts.glob("mla_seam/**/__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    gpu = {p.parent.name for p in (REPO_ROOT / "tests" / "gpu").glob("*/*.py")}
    assert {f"mla_seam._bundle.tests.gpu.{name}" for name in gpu} <= listed
