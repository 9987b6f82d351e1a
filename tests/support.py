"""Helpers the CPU test modules share that are not fixtures (those are in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
from mla_seam import cli, gitlayer, suite
from mla_seam.export import write_series
from mla_seam.paths import ADAPTER_RELPATH
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


# --- real checkouts and the bundle copy of the rebase, drift and nightly tests ----------------

REPO = Path(__file__).resolve().parents[1]
COMBO = ("0.13.1", "0.14.0", "0.16.1", "0.17.1", "0.18.2", "0.19.2")
MLA = "megatron/core/transformer/multi_latent_attention.py"
LM = "megatron/core/models/common/language_module/language_module.py"
TL = "megatron/core/transformer/transformer_layer.py"
TC = "megatron/core/transformer/transformer_config.py"
#: The date of the rebase tests' synthetic commits.
REBASE_DATE = "2026-11-27T12:00:00+00:00"


def make_bundle(dest: Path) -> Path:
    """A writable copy of the repository's ``patches/`` and ``overlay/`` at ``dest``."""
    for name in ("patches", "overlay"):
        shutil.copytree(REPO / name, dest / name)
    return dest


def run(capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, str]:
    """``mla-seam ARGS`` in this process: exit code and stdout."""
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def run_subprocess(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m mla_seam ARGS`` (for exit codes under signals and messages on stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_of(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def repo_state(path: Path) -> Tuple[str, str, str, str]:
    """HEAD, refs, index and work-tree status of a checkout: what rebase must never change."""
    repo = gitlayer.open_repo(path)
    assert repo is not None
    return (
        repo.git.rev_parse("HEAD"),
        repo.git.for_each_ref(),
        repo.git.ls_files("--stage"),
        repo.git.status("--porcelain", "--ignored"),
    )


def commit_all(repo_dir: Path, message: str) -> str:
    """Commit every change in ``repo_dir`` with a fixed identity (a synthetic upstream commit)."""
    repo = gitlayer.open_repo(repo_dir)
    return gitlayer.commit_all(repo, message, REBASE_DATE)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


# --- the synthetic bundle and trees of the apply tests ------------------------------------------

REPO_ROOT = REPO
# Synthetic hooks: (commit subject, [(file, insert after line, text)]). Comment lines only, so the
# patched tree still imports; H2 touches MLA again so patches stack on one file.
HOOKS: Tuple[Tuple[str, Tuple[Tuple[str, int, str], ...]], ...] = (
    ("mla-seam H1: core attention hook", ((MLA, 40, "# mla-seam hook H1"),)),
    ("mla-seam H2: config hook", ((MLA, 80, "# mla-seam hook H2"), (TC, 79, "# mla-seam hook H2"))),
    ("mla-seam H3: backend hook", ((LM, 20, "# mla-seam hook H3"),)),
)
VARIANT_LINES = 3  # lines the "0.16.0" variant inserts above every hook in MLA
RELEASES = {"0.16": ("0.16.0", "0.16.1"), "0.19": ("0.19.2",)}
BASE = {"0.16": "0.16.1", "0.19": "0.19.2"}
SYNTHETIC_ADAPTER = b'''"""Synthetic mla-seam adapter used by the apply tests."""

HAVE_TE = False


def resolve_attention_backend(config, spec=None):
    """Record the spec the summary asked for."""
    config.spec = spec


def describe(config) -> str:
    """One summary line."""
    return f"synthetic adapter: describe ok ({config.kwargs['v_head_dim']}, {config.spec})"
'''
#: The ``MLATransformerConfig`` of a synthetic tree (the summary builds one).
SYNTHETIC_CONFIG = b'''"""Synthetic transformer_config used by the apply tests."""


class MLATransformerConfig:
    """Keeps its keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
'''
DATE = "2026-01-01T00:00:00+00:00"
_MEMO: Dict[str, Path] = {}


# --- building trees ------------------------------------------------------------------------


def insert_lines(root: Path, edits: Iterable[Tuple[str, int, str]]) -> None:
    """Insert ``text`` after line ``after`` of each file (bytes kept exactly otherwise)."""
    for rel, after, text in edits:
        path = root / rel
        lines = path.read_bytes().split(b"\n")
        lines.insert(after, text.encode())
        path.write_bytes(b"\n".join(lines))


def set_version(root: Path, version: str) -> None:
    """Rewrite MAJOR/MINOR/PATCH in package_info.py (keeps every other byte)."""
    path = root / "megatron/core/package_info.py"
    major, minor, patch = version.split(".")
    text = path.read_text()
    for name, value in (("MAJOR", major), ("MINOR", minor), ("PATCH", patch)):
        start = text.index(f"\n{name} = ") + len(f"\n{name} = ")
        end = text.index("\n", start)
        text = text[:start] + value + text[end:]
    path.write_text(text)


def commit(root: Path, message: str) -> str:
    """Commit everything in ``root`` with the fixed mla-seam identity and date."""
    return gitlayer.commit_all(gitlayer.open_repo(root), message, DATE)


def copy_tree(src: Path, dest: Path, with_git: bool = True) -> Path:
    """An independent copy of a tree (``.git`` included unless ``with_git`` is false)."""
    ignore = None if with_git else shutil.ignore_patterns(".git")
    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


def _template(factory: Callable[[str, Path], Path], version: str, base: Path) -> Path:
    key = f"template-{version}"
    if key not in _MEMO:
        _MEMO[key] = factory(version, base / key)
    return _MEMO[key]


def _variant_template(factory: Callable[[str, Path], Path], base: Path) -> Path:
    """A 0.16.1 checkout edited into a synthetic "0.16.0": MLA moved down by a few lines."""
    key = "template-variant-0.16.0"
    if key not in _MEMO:
        tree = copy_tree(_template(factory, "0.16.1", base), base / key)
        insert_lines(tree, [(MLA, 2, f"# variant line {i}") for i in range(VARIANT_LINES)])
        set_version(tree, "0.16.0")
        commit(tree, "synthetic megatron-core 0.16.0")
        _MEMO[key] = tree
    return _MEMO[key]


def build_line(factory: Callable[[str, Path], Path], base: Path, line: str, out_dir: Path) -> Path:
    """Export the synthetic hook series of ``line`` into ``out_dir`` with write_series."""
    work = copy_tree(_template(factory, BASE[line], base), base / f"work-{line}")
    repo = gitlayer.open_repo(work)
    base_ref = repo.head.commit.hexsha
    extra = {}
    if line == "0.16":
        variant = _variant_template(factory, base)
        repo.git.fetch(str(variant), "HEAD:refs/tags/variant-0.16.0")
        extra = {"0.16.0": "variant-0.16.0"}
    for subject, edits in HOOKS:
        insert_lines(work, edits)
        commit(work, f"{subject}\n\nHook: synthetic test hook\nLast-Update: 2026-01-01")
    write_series(
        repo,
        base_ref,
        "HEAD",
        out_dir,
        line,
        RELEASES[line],
        {"tag": f"core_v{BASE[line]}", "commit": base_ref, "source": "test"},
        {ADAPTER_RELPATH: SYNTHETIC_ADAPTER},
        extra_bases=extra,
    )
    return work


def synthetic_bundle(factory: Callable[[str, Path], Path], base: Path) -> Path:
    """``<base>/bundle`` with ``overlay/`` and ``patches/core_v0.16``, ``core_v0.19`` (memoized)."""
    if "bundle" not in _MEMO:
        bundle = base / "bundle"
        adapter = bundle / "overlay" / ADAPTER_RELPATH
        adapter.parent.mkdir(parents=True)
        adapter.write_bytes(SYNTHETIC_ADAPTER)
        for line in RELEASES:
            build_line(factory, base, line, bundle / "patches" / f"core_v{line}")
        _MEMO["bundle"] = bundle
    return _MEMO["bundle"]


def run_cli(
    env: Dict[str, str],
    *args: str,
    cwd: Optional[Path] = None,
    extra: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """``python -m mla_seam apply ARGS`` in a subprocess; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mla_seam", "apply", *args],
        env={**env, **(extra or {})},
        cwd=str(cwd) if cwd else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


def tree_hash(root: Path, skip: Sequence[str] = (".git", ".mla-seam")) -> str:
    """sha256 over every file's path, mode and bytes (and symlink targets) under ``root``."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) == root and d in skip))
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            path = Path(dirpath) / name
            info = path.lstat()
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(oct(info.st_mode).encode() + b"\0")
            data = os.readlink(path).encode() if stat.S_ISLNK(info.st_mode) else path.read_bytes()
            digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def git_snapshot(root: Path) -> Optional[Tuple[str, str]]:
    """HEAD and the full index listing of a git tree (``None`` for a plain folder)."""
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    return git("rev-parse", "HEAD"), git("ls-files", "--stage", "-z")


def snapshot(root: Path) -> Tuple[str, Optional[Tuple[str, str]]]:
    """What must survive a refused or repaired run: the files, HEAD and the index."""
    return tree_hash(root), git_snapshot(root)


def state_dir(root: Path) -> Path:
    """Where mla-seam keeps its state for ``root``."""
    return root / ".git" / "mla-seam" if (root / ".git").exists() else root / ".mla-seam"


# --- tests: loading and validation ---------------------------------------------------------


def sample_fast(
    values: Sequence[Any], group: Callable[[Any], Any], every: int, ids: Callable[[Any], str]
) -> List[Any]:
    """``pytest.param`` per value: in the default run the first value of each ``group`` and
    every ``every``-th value, the others marked ``slow`` (a table of trials or rows: a sample of
    each kind stands for it until ``--run-slow``)."""
    seen = set()
    params = []
    for index, value in enumerate(values):
        first = group(value) not in seen
        seen.add(group(value))
        fast = first or index % every == 0
        params.append(pytest.param(value, marks=() if fast else slow, id=ids(value)))
    return params


# --- the GPU suite's CPU tests ---------------------------------------------------------------

#: A probed device as the suite tests give it (no GPU needed).
GPU = suite.DeviceInfo(
    python="3.12.0",
    torch="2.11.0",
    cuda=True,
    cuda_build="12.9",
    device_count=1,
    name="NVIDIA H100 80GB HBM3",
    capability=[9, 0],
    memory_gib=79.1,
    cudnn=91000,
    te="2.20.2",
    transformers="5.17.0",
)


def fake_tree(root: Path, version=(0, 19, 2), patched=True) -> Path:
    """A folder that reads as a Megatron tree of ``version`` (patched: with an adapter file)."""
    core = root / "megatron" / "core"
    (core / "transformer").mkdir(parents=True)
    major, minor, patch = version
    (core / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n"
    )
    if patched:
        (root / suite.ADAPTER_RELPATH).write_text("# adapter\n")
    return root
