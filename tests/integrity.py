"""Kill trials and bad inputs for ``mla-seam apply``: the harness shared by ``test_integrity.py``
and ``benchmarks/bench_integrity.py``.

Runs are real processes: :func:`run` forks this process and the child runs the CLI's ``main``
(the code ``python -m mla_seam`` runs, minus the interpreter start), with its own environment,
stdout and stderr. A child that dies by SIGKILL died for real (``MLA_SEAM_CRASH_AT`` makes the
CLI kill itself at a named step; :func:`run` can also kill it from outside after a delay). An
exception escaping ``main`` is a traceback (exit :data:`TRACEBACK`).

Trees are small and real: a git repository (or a plain folder) holding megatron-core 0.19.2's
``package_info.py`` and the four files the real 0.19 series touches, from the cached release
checkout, and the real bundle of this repository. A tree's state is compared as a whole: every
file's bytes and mode, and in git trees HEAD's tree, the number of commits, the index and
``git status``; "consistent" means equal to the state before the run or the state a completed
run leaves, nothing in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE = "0.19.2"
LINE = "core_v0.19"
MLA = "megatron/core/transformer/multi_latent_attention.py"
TC = "megatron/core/transformer/transformer_config.py"
LM = "megatron/core/models/common/language_module/language_module.py"
TL = "megatron/core/transformer/transformer_layer.py"
INFO = "megatron/core/package_info.py"
ADAPTER = "megatron/core/transformer/mla_adapter.py"
FILES = (INFO, LM, MLA, TC, TL)
TRACEBACK = 250  # exit status of a child whose main() raised
DATE = "2026-01-01T00:00:00+00:00"
IDENT = {
    "GIT_AUTHOR_NAME": "Fork Owner",
    "GIT_AUTHOR_EMAIL": "owner@fork.example",
    "GIT_COMMITTER_NAME": "Fork Owner",
    "GIT_COMMITTER_EMAIL": "owner@fork.example",
    "GIT_AUTHOR_DATE": DATE,
    "GIT_COMMITTER_DATE": DATE,
}


# --- running the CLI -----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """A child run: its exit code (or the signal that ended it) and what it printed."""

    code: Optional[int]
    signal: Optional[int]
    out: str
    err: str

    @property
    def traceback(self) -> bool:
        return self.code == TRACEBACK or "Traceback (most recent call last)" in self.err

    @property
    def text(self) -> str:
        return self.out + self.err


def _child(
    argv: Sequence[str], env: Dict[str, Optional[str]], cwd: Optional[Path], remove_cwd: bool
) -> int:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if cwd is not None:
        os.chdir(cwd)
        if remove_cwd:
            os.rmdir(cwd)  # the folder the shell was in is deleted under it
    sys.stdout = open(
        1, "w", encoding="utf-8", closefd=False
    )  # pylint: disable=consider-using-with
    sys.stderr = open(
        2, "w", encoding="utf-8", closefd=False
    )  # pylint: disable=consider-using-with
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    from mla_seam import cli  # pylint: disable=import-outside-toplevel

    return cli.main(list(argv))


_WARM: List[bool] = []


def _warm() -> None:
    """Import every verb module here once, so that children do not (forks share them)."""
    if not _WARM:
        from mla_seam import cli  # pylint: disable=import-outside-toplevel

        cli.build_parser()
        _WARM.append(True)


def run(
    argv: Sequence[str],
    env: Optional[Dict[str, Optional[str]]] = None,
    cwd: Optional[Path] = None,
    kill_after: Optional[float] = None,
    timeout: float = 120.0,
    remove_cwd: bool = False,
) -> Result:
    """``mla-seam ARGV`` in a forked child; ``env`` entries set (``None``: removed) there only."""
    _warm()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller
            code = TRACEBACK
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = int(_child(argv, dict(env or {}), cwd, remove_cwd))
            except BaseException:  # pylint: disable=broad-except
                traceback.print_exc()
                code = TRACEBACK
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)  # pylint: disable=protected-access
        deadline = time.monotonic() + timeout
        if kill_after is not None:
            time.sleep(kill_after)
            with _suppress_gone():
                os.kill(pid, signal.SIGKILL)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"mla-seam {' '.join(argv)} ran over {timeout} s")
            time.sleep(0.002)
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read().decode(errors="replace"), err.read().decode(
            errors="replace"
        )
    if os.WIFSIGNALED(status):
        return Result(None, os.WTERMSIG(status), text_out, text_err)
    return Result(os.WEXITSTATUS(status), None, text_out, text_err)


class _suppress_gone:  # pylint: disable=invalid-name
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError)


REAL_ENV: Dict[str, Optional[str]] = {
    "MLA_SEAM_ROOT": None,  # the repository's own bundle
    "MLA_SEAM_CRASH_AT": None,
    "MLA_SEAM_CRASH_SIGNAL": None,
    **IDENT,
}


def apply(*args: str, env: Optional[Dict[str, Optional[str]]] = None, **kw: object) -> Result:
    """``mla-seam apply ARGS`` with the real bundle."""
    return run(["apply", *args], {**REAL_ENV, **(env or {})}, **kw)  # type: ignore[arg-type]


def apply_again(*args: str) -> Result:
    """``mla-seam apply ARGS`` run again after a kill, as a user would: while a git process the
    killed run had started still holds a lock (exit 12 or 28), wait and retry, up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        done = apply(*args)
        if done.code not in (12, 28) or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def crash(args: Sequence[str], step: str, sig: str = "KILL") -> Result:
    """``mla-seam apply ARGS`` killed by itself at ``step``."""
    return apply(*args, env={"MLA_SEAM_CRASH_AT": step, "MLA_SEAM_CRASH_SIGNAL": sig})


# --- trees ---------------------------------------------------------------------------------


def git(tree: Path, *args: str, check: bool = True) -> str:
    """``git ARGS`` in ``tree`` with a fixed identity."""
    done = subprocess.run(
        ["git", *args], cwd=tree, capture_output=True, text=True, env={**os.environ, **IDENT}
    )
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout


def tiny_tree(release: Path, dest: Path, git_repo: bool = True) -> Path:
    """The release's ``package_info.py`` and the four hooked files, nothing else (committed)."""
    for rel in FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(release / rel, dest / rel)
    if git_repo:
        git(dest, "init", "-q", "-b", "main")
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "-m", "megatron-core 0.19.2 (the hooked files)")
    return dest


def make_fork(tree: Path) -> Path:
    """A fork that picked H3 by hand (committed) and reworded a line in H1's context, so apply
    needs ``--3way`` and leaves H3's hunk alone."""
    patch = sorted((REPO_ROOT / "patches" / LINE).glob("0003-*.patch"))[0]
    git(tree, "apply", str(patch))
    lines = (tree / MLA).read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "submodules.core_attention," in line)
    lines[at - 4] = lines[at - 4].rstrip("\n") + "  # fork: reworded\n"
    (tree / MLA).write_text("".join(lines))
    git(tree, "commit", "-q", "-am", "fork: pick H3 by hand, reword next to H1")
    return tree


def copy(src: Path, dest: Path) -> Path:
    """An independent copy of a tree (its ``.git`` and state folder included)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def state_dir(tree: Path) -> Path:
    """mla-seam's state folder of ``tree``."""
    return tree / ".git" / "mla-seam" if (tree / ".git").exists() else tree / ".mla-seam"


def files_hash(root: Path) -> str:
    """sha256 over every file's path, mode and bytes under ``root`` (``.git``, state folder
    excluded)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not (Path(dirpath) == root and d in (".git", ".mla-seam"))
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            digest.update(str(path.relative_to(root)).encode() + b"\0" + oct(info.st_mode).encode())
            data = os.readlink(path).encode() if stat.S_ISLNK(info.st_mode) else path.read_bytes()
            digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A tree as a whole: its files and, for a git tree, HEAD's tree, history length and the
    index's entries (with those three equal to a reference, ``git status`` is too)."""

    files: str
    head_tree: str = ""
    commits: int = 0
    index: Tuple[Tuple[str, int, str, int], ...] = ()


def snapshot(tree: Path) -> Snapshot:
    """The tree's state (see :class:`Snapshot`), read in-process (GitPython's object and index
    readers: no git process)."""
    if not (tree / ".git").exists():
        return Snapshot(files_hash(tree))
    import git as gitpython  # pylint: disable=import-outside-toplevel

    try:
        with warnings.catch_warnings():
            # GitPython's pure-Python object reader: no git process per snapshot, and no
            # safe.directory refusal for a tree made to belong to another user. Deprecated as a
            # backend for untrusted repositories; these are the tests' own.
            warnings.simplefilter("ignore", DeprecationWarning)
            repo = gitpython.Repo(tree, odbt=gitpython.GitDB)
    except (gitpython.InvalidGitRepositoryError, gitpython.NoSuchPathError):
        return Snapshot(files_hash(tree), "(no usable repository)")
    try:
        index = gitpython.IndexFile(repo) if (Path(repo.git_dir) / "index").exists() else None
        entries = tuple(
            sorted((path, entry.mode, entry.hexsha, stage)
                   for (path, stage), entry in (index.entries.items() if index else ()))
        )  # fmt: skip
        try:
            head = repo.head.commit
        except ValueError:  # no commit yet, or git refuses the repository (another owner)
            return Snapshot(files_hash(tree), "(no HEAD)", 0, entries)
        return Snapshot(files_hash(tree), head.tree.hexsha, _history_length(head), entries)
    finally:
        repo.close()


def _history_length(head: object) -> int:
    """Commits reachable from ``head``, walked in-process (no git process)."""
    seen, todo = set(), [head]
    while todo:
        commit = todo.pop()
        if commit.binsha in seen:  # type: ignore[attr-defined]
            continue
        seen.add(commit.binsha)  # type: ignore[attr-defined]
        todo.extend(commit.parents)  # type: ignore[attr-defined]
    return len(seen)


def leftovers(tree: Path) -> List[str]:
    """What an interrupted run may leave and a finished or repaired one must not."""
    folder = state_dir(tree)
    found = [str(p) for p in tree.rglob(".*.mla-seam-*")]
    found += [str(p) for p in folder.glob("scratch-*")] + [str(p) for p in folder.glob(".*.tmp")]
    if (folder / "txn").exists():
        found.append(str(folder / "txn"))
    return found


# --- kill trials ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    """One kill: which tree, which run (apply or revert, working-tree or commit mode, --3way),
    where it dies (a named step, or after a delay from outside), and, optionally, where the
    next run's recovery dies too."""

    variant: str  # release | fork | plain
    op: str  # apply | revert
    mode: str  # worktree | commit
    step: str  # a crash step, or "t=<seconds>" for a kill from outside
    recovery_step: str = ""

    @property
    def id(self) -> str:
        extra = f"+{self.recovery_step}" if self.recovery_step else ""
        return f"{self.variant}-{self.op}-{self.mode}-{self.step}{extra}"

    def args(self, tree: Path) -> List[str]:
        flags = (["--revert"] if self.op == "revert" else []) + (
            ["--commit"] if self.mode == "commit" else []
        )
        if self.variant == "fork" and self.op == "apply":
            flags.append("--3way")
        return [*flags, str(tree)]


COMMITTED = ("state-written", "head-moved", "index-reset", "journal-removed", "txn-removed")


def steps_of(variant: str, mode: str) -> List[str]:
    """Every crash step an apply or revert of this kind passes, in order."""
    changes = 4 if variant == "fork" else 5  # the fork's LM keeps H3: one file fewer changes
    steps = ["startup", "locked", "preflight-done", "post-images-built"]
    if mode == "commit":
        steps.append("commits-built")
    steps += ["txn-staged", "journal-written"] + [f"replaced:{k}" for k in range(1, changes + 1)]
    steps.append("state-written")
    if mode == "commit":
        steps += ["head-moved", "index-reset"]
    return steps + ["journal-removed", "txn-removed"]


class Templates:
    """The trees trials start from and the states a completed run leaves, built once."""

    def __init__(self, release: Path, base: Path) -> None:
        self.release, self.base = release, base
        self._cache: Dict[Tuple[str, str, str], Tuple[Path, Snapshot, Snapshot]] = {}

    def get(self, variant: str, op: str, mode: str) -> Tuple[Path, Snapshot, Snapshot]:
        """``(start tree, its snapshot, the snapshot after the run completes)``."""
        key = (variant, op, mode)
        if key not in self._cache:
            name = "-".join(key)
            pristine = tiny_tree(self.release, self.base / f"{name}-pristine", variant != "plain")
            if variant == "fork":
                make_fork(pristine)
            flags = (["--commit"] if mode == "commit" else []) + (
                ["--3way"] if variant == "fork" else []
            )
            applied = copy(pristine, self.base / f"{name}-applied")
            done = apply(*flags, str(applied))
            assert done.code == 0, done.text
            if op == "apply":
                self._cache[key] = (pristine, snapshot(pristine), snapshot(applied))
            else:
                reverted = copy(applied, self.base / f"{name}-reverted")
                undo = apply("--revert", *(["--commit"] if mode == "commit" else []), str(reverted))
                assert undo.code == 0, undo.text
                self._cache[key] = (applied, snapshot(applied), snapshot(reverted))
        return self._cache[key]


def trials() -> List[Trial]:
    """Every kill trial of the suite: each step of apply and revert, in both modes, on a
    release, a fork needing --3way (and holding one hook already) and a plain folder; kills
    during the next run's recovery; kills from outside at spread-out moments."""
    result: List[Trial] = []
    for variant, modes in (("release", ("worktree", "commit")), ("fork", ("worktree", "commit")),
                           ("plain", ("worktree",))):  # fmt: skip
        for mode in modes:
            for op in ("apply", "revert"):
                result += [Trial(variant, op, mode, step) for step in steps_of(variant, mode)]
    for variant in ("release", "fork"):
        for mode in ("worktree", "commit"):
            for op in ("apply", "revert"):
                result += [
                    Trial(variant, op, mode, "replaced:3", rec)
                    for rec in ("recover-restored:1", "recover-restored:2",
                                "recover-journal-removed")
                ]  # fmt: skip
                if mode == "commit":
                    result.append(Trial(variant, op, mode, "state-written", "recover-head-moved"))
    for k in range(12):
        for mode in ("worktree", "commit"):
            result.append(Trial("release", "apply" if k % 2 else "revert", mode, f"t={k}"))
    return result


def recover(tree: Path) -> List[str]:
    """What every run does first, in this process: lock the tree, finish or roll back an
    interrupted transaction (HEAD included); returns the repair notes.

    A process killed while it was starting git leaves a child that holds the inherited lock for
    the moment it takes to close its descriptors: the lock is tried again for up to 10 s, as a
    user running the command again would.
    """
    from mla_seam.errors import LockedError  # pylint: disable=import-outside-toplevel
    from mla_seam.statefolder import StateFolder  # pylint: disable=import-outside-toplevel
    from mla_seam.tree import MegatronTree  # pylint: disable=import-outside-toplevel

    deadline = time.monotonic() + 10
    while True:
        folder = StateFolder(MegatronTree.resolve(tree))
        try:
            with folder.session(write=False):
                return folder.recover() if folder.locked else []
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_trial(
    trial: Trial, templates: Templates, tmp: Path, duration: float = 0.4, finish: bool = True
) -> str:
    """Kill a run as the trial says, repair it as the next run does, and check the tree (and,
    with ``finish``, that the run after that completes the job).

    Returns ``""`` when every check holds, else what was inconsistent.
    """
    start, before, after = templates.get(trial.variant, trial.op, trial.mode)
    tree = copy(start, tmp / "tree")
    args = trial.args(tree)
    if trial.step.startswith("t="):
        delay = duration * (int(trial.step[2:]) + 0.5) / 12
        killed = apply(*args, kill_after=delay)
        committed: Optional[bool] = None  # depends on when the kill landed
    else:
        killed = crash(args, trial.step)
        committed = trial.step in COMMITTED
        if killed.signal != signal.SIGKILL:
            return f"the run was not killed at {trial.step}: exit {killed.code}\n{killed.text}"
    if killed.traceback:
        return f"traceback in the killed run:\n{killed.err}"
    if trial.recovery_step:
        again = crash(["--status", str(tree)], trial.recovery_step)
        if again.signal != signal.SIGKILL:
            return f"recovery was not killed at {trial.recovery_step}: {again.text}"
    recover(tree)
    now = snapshot(tree)
    wanted = {True: [after], False: [before], None: [before, after]}[committed]
    if now not in wanted:
        return f"inconsistent after recovery: {now} is neither {before} nor {after}"
    if leftovers(tree):
        return f"leftovers after recovery: {leftovers(tree)}"
    if not finish:
        return ""
    again = apply_again(*args)
    if again.code != 0 or again.traceback:
        return f"the next run: exit {again.code}\n{again.text}"
    if snapshot(tree) != after:
        return f"the next run did not complete the {trial.op}: {snapshot(tree)} != {after}"
    return ""
