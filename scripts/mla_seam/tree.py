"""The Megatron tree mla-seam works on, and its private state folder with the commit journal.

A tree is found from a checkout root, a site-packages-like folder, or the ``megatron`` package
folder itself; its version is read from ``megatron/core/package_info.py`` by parsing, never by
importing. Git work trees and plain folders are handled the same way; only the place of the
state folder differs.

State folder (``<git-dir>/mla-seam/`` in a git work tree, ``<root>/.mla-seam/`` otherwise)::

    lock            flock(2) target; holds the pid of the process that has it
    state.json      what is applied: line, release, series sha256, per-file pre/post, overlay,
                    how (exact, fork, 3way; worktree or commit mode), offsets
    objects/<blob>  the bytes every touched file had before apply, named by their git blob id:
                    --revert restores them exactly (a fork's own bytes too)
    scratch-<id>/   post-images being built (removed when done; leftovers removed on start)
    txn/            exists only while a change is being committed
      backup/<rel>  original bytes of every file the change rewrites or deletes
      new/<rel>     new bytes of every file the change writes
      journal.json  written last (atomically): the transaction is now in progress

Commit protocol (:meth:`StateFolder.commit`), each step named for ``MLA_SEAM_CRASH_AT``:

1. ``txn-staged``: backups and new bytes written to ``txn/`` and fsynced.
2. ``journal-written``: ``txn/journal.json`` replaced in atomically, folder fsynced.
3. ``replaced:<k>``: file k copied to a temp name next to its target (mode and owner kept),
   fsynced and ``os.replace``-d over it (or deleted). The commit point is step 4.
4. ``state-written``: ``state.json`` (carrying the transaction id) replaced in atomically.
5. ``journal-removed``: the journal deleted; 6. ``txn-removed``: ``txn/`` deleted.

Recovery (:meth:`StateFolder.recover`, on every run before anything else): a journal whose id
``state.json`` records is finished (journal deleted); any other journal is rolled back: every
file is restored from its backup (temp copy + ``os.replace``, steps ``recover-restored:<k>``),
files that did not exist are deleted, then the journal (``recover-journal-removed``) and
``txn/`` go. Restoring is idempotent, so a crash during recovery is repaired by the next run.
A ``txn/`` without a journal had not touched the tree and is just deleted.

A write that fails inside a transaction (disk full, a name too long) is rolled back at once, in
the same process, before the error is reported; when even that fails, the journal stays for the
next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import git
from mla_seam import __version__, gitlayer, releases
from mla_seam.errors import (
    LockedError,
    NotMegatronTreeError,
    ReadOnlyTreeError,
    StateCorruptError,
    TreeNotFoundError,
)
from mla_seam.series import json_bytes

log = logging.getLogger(__name__)

STATE_SCHEMA = 1
CRASH_ENV = "MLA_SEAM_CRASH_AT"  # test hook: step name at which the process signals itself
CRASH_SIGNAL_ENV = "MLA_SEAM_CRASH_SIGNAL"  # KILL (default), INT or TERM
CRASH_STEPS = (
    "startup",
    "locked",
    "preflight-done",
    "post-images-built",
    "txn-staged",
    "journal-written",
    "replaced:<k>",
    "state-written",
    "journal-removed",
    "txn-removed",
    "recover-restored:<k>",
    "recover-journal-removed",
)


def crash_point(step: str) -> None:
    """Test hook: signal this process at ``step`` when ``MLA_SEAM_CRASH_AT`` names it.

    ``MLA_SEAM_CRASH_SIGNAL=ENOSPC`` raises a "no space left on device" error there instead (a
    write failing on a full disk).
    """
    if os.environ.get(CRASH_ENV) != step:
        return
    name = os.environ.get(CRASH_SIGNAL_ENV, "KILL").upper()
    if name == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {step})")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


# --- the tree ------------------------------------------------------------------------------


def read_version(root: os.PathLike) -> str:
    """``MAJOR.MINOR.PATCH[PRE_RELEASE]`` from ``megatron/core/package_info.py`` (parsed, not run).

    Raises:
        NotMegatronTreeError: the file is missing or does not define the version numbers.
    """
    try:
        return releases.read_version(root)
    except releases.VersionNotFound as exc:
        raise NotMegatronTreeError(
            str(exc), "point mla-seam at a megatron-core checkout or installation of a release"
        ) from None


def _find_root(path: Path) -> Path:
    """The folder that contains ``megatron/core`` for a path the user gave."""
    if (path / "megatron" / "core").is_dir():
        return path  # checkout root or site-packages-like folder
    if path.name == "megatron" and (path / "core").is_dir():
        return path.parent
    if path.name == "core" and path.parent.name == "megatron":
        return path.parent.parent
    raise NotMegatronTreeError(
        f"{path} holds no megatron/core package",
        "pass the Megatron-LM checkout root, the site-packages folder that holds megatron/, "
        "or the megatron package folder itself",
    )


@dataclasses.dataclass(frozen=True)
class MegatronTree:
    """A megatron-core source tree: where it is, which release, git or not, its state folder."""

    root: Path
    version: str
    repo: Optional[git.Repo]
    state_dir: Path

    @classmethod
    def resolve(cls, arg: os.PathLike) -> "MegatronTree":
        """Find the tree for ``arg`` (checkout root, site-packages folder or ``megatron/``).

        Raises:
            TreeNotFoundError: ``arg`` does not exist or is not a folder.
            NotMegatronTreeError: no ``megatron/core`` there, or no readable version.
        """
        path = Path(arg).expanduser()
        if not path.exists():
            raise TreeNotFoundError(f"{path} does not exist", "pass the path of a Megatron-LM tree")
        if not path.is_dir():
            raise TreeNotFoundError(
                f"{path} is not a directory", "pass the folder of a Megatron-LM tree, not a file"
            )
        root = _find_root(path.resolve())
        version = read_version(root)
        repo = gitlayer.open_repo(root)
        state_dir = gitlayer.git_dir(repo) / "mla-seam" if repo is not None else root / ".mla-seam"
        return cls(root=root, version=version, repo=repo, state_dir=state_dir)

    @property
    def is_git(self) -> bool:
        """Whether the tree is the top level of a git work tree."""
        return self.repo is not None

    def describe(self) -> str:
        """``/path (megatron-core 0.16.1, git work tree)`` for messages."""
        kind = "git work tree" if self.is_git else "plain folder"
        return f"{self.root} (megatron-core {self.version}, {kind})"


# --- atomic file helpers -------------------------------------------------------------------


def fsync_dir(path: os.PathLike) -> None:
    """fsync a folder so that renames and deletions in it are durable."""
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create or truncate ``path`` with ``data`` and fsync it (not atomic by itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode & 0o7777)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode & 0o7777)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` all-or-nothing: temp file, fsync, ``os.replace``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- the state folder ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
    """One tree file a transaction writes (``new`` bytes) or deletes (``new`` is ``None``)."""

    rel: str
    old_blob: Optional[str]
    new: Optional[bytes]
    new_blob: Optional[str]


class StateFolder:
    """The tree's state folder: lock, ``state.json``, scratch space and the commit journal."""

    def __init__(self, tree: MegatronTree) -> None:
        self.tree = tree
        self.path = tree.state_dir
        self.locked = False
        self.repairs: List[str] = []  # what recovery did in this run, for the user
        self.committed: Optional[str] = None  # "<op> (txn <id>)" once this run passed step 4
        self._fd: Optional[int] = None

    @property
    def txn_dir(self) -> Path:
        return self.path / "txn"

    @property
    def journal_path(self) -> Path:
        return self.txn_dir / "journal.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    # -- lock --

    @contextlib.contextmanager
    def session(self, write: bool) -> Iterator["StateFolder"]:
        """Hold the tree's lock for the duration of a run.

        Read-only runs (``write=False``) lock only when a state folder exists (something may
        need recovery), and go on unlocked, with a warning, when it cannot be written.
        """
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise StateCorruptError(
                f"mla-seam's state folder {self.path} is not a folder (a file or a broken link)",
                f"move it away (mv {self.path} {self.path}.aside); mla-seam keeps what it applied "
                "there, so keep the copy if it came from an earlier run",
            )
        if write or self.path.exists():
            try:
                self._acquire()
            except ReadOnlyTreeError as exc:
                if write:
                    raise
                log.warning("mla-seam: %s; reading without the lock", exc.message)
        try:
            yield self
        finally:
            self._release()

    def _acquire(self) -> None:
        for _ in range(100):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(str(self.lock_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue  # a finishing holder removed the empty folder in between: again
            except OSError as exc:
                raise self._read_only(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise LockedError(
                    f"another mla-seam process (pid {holder or 'unknown'}) is working on "
                    f"{self.tree.root}",
                    "wait for it to finish and run again; the lock goes away by itself when "
                    "that process exits",
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # a finishing holder removed the lock file; lock the new one
        else:
            raise LockedError(f"cannot settle the lock {self.lock_path}", "run again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self.locked = fd, True

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
        except FileNotFoundError:
            return False

    def _read_only(self, exc: OSError) -> ReadOnlyTreeError:
        return ReadOnlyTreeError(
            f"cannot write mla-seam's state folder {self.path}: {exc.strerror}",
            "make the tree writable for this user (chmod/chown, or remount read-write), or run "
            "mla-seam as the tree's owner",
        )

    def _release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            leftovers = [p.name for p in self.path.iterdir() if p.name != "lock"]
            if not leftovers:  # nothing applied, nothing pending: leave no trace
                os.unlink(self.lock_path)
                self.path.rmdir()
        os.close(self._fd)
        self._fd, self.locked = None, False

    # -- state.json --

    def read_state(self) -> Optional[dict]:
        """``state.json``, or ``None``; an unreadable one is moved aside (when locked)."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(data)
            if isinstance(state, dict) and state.get("schema") == STATE_SCHEMA:
                return state
            problem = "unknown schema"
        except ValueError as exc:
            problem = str(exc)
        if self.locked:
            aside = self.state_path.with_name("state.json.corrupt")
            os.replace(self.state_path, aside)
            self.repairs.append(
                f"state.json was unreadable ({problem}); moved to {aside}; the state is "
                "recomputed from the tree's files"
            )
        else:
            log.warning(
                "mla-seam: %s is unreadable (%s); the state is recomputed from the tree's files",
                self.state_path,
                problem,
            )
        return None

    def write_state(self, state: Optional[dict]) -> None:
        """Replace ``state.json`` atomically (``None`` deletes it)."""
        if state is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)
            return
        replace_atomic(self.state_path, json_bytes({"schema": STATE_SCHEMA, **state}))

    # -- pristine bytes --

    @property
    def objects_dir(self) -> Path:
        return self.path / "objects"

    def store_objects(self, objects: Dict[str, bytes]) -> None:
        """Keep ``blob id -> bytes`` in ``objects/`` (durable; an existing object is kept)."""
        for blob, data in objects.items():
            target = self.objects_dir / blob
            if not target.is_file():
                replace_atomic(target, data)

    def load_object(self, blob: str) -> Optional[bytes]:
        """The stored bytes of ``blob``, or ``None``."""
        try:
            return (self.objects_dir / blob).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def drop_objects(self) -> None:
        """Forget every stored object (after a revert)."""
        shutil.rmtree(self.objects_dir, ignore_errors=True)

    # -- scratch --

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh folder inside the state folder, removed afterwards."""
        path = self.path / f"scratch-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- commit --

    def commit(self, op: str, changes: Sequence[Change], state: Optional[dict]) -> str:
        """Apply ``changes`` to the tree all-or-nothing and record ``state``; return the txn id.

        An interruption at any point leaves a journal that :meth:`recover` completes or rolls
        back; see the module docstring for the steps.
        """
        txn = uuid.uuid4().hex[:16]
        try:
            entries = self._stage(txn, changes)
        except OSError:
            shutil.rmtree(self.txn_dir, ignore_errors=True)  # the tree was not touched
            raise
        crash_point("txn-staged")
        journal = {
            "schema": STATE_SCHEMA,
            "txn": txn,
            "op": op,
            "pid": os.getpid(),
            "files": entries,
        }
        try:
            replace_atomic(self.journal_path, json_bytes(journal))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.journal_path.with_name(f".{self.journal_path.name}.tmp"))
            shutil.rmtree(self.txn_dir, ignore_errors=True)
            raise
        crash_point("journal-written")
        try:
            for k, (entry, change) in enumerate(zip(entries, changes), start=1):
                self._install(entry, change.new)
                crash_point(f"replaced:{k}")
            for folder in sorted({(self.tree.root / e["path"]).parent for e in entries}):
                fsync_dir(folder)
            self.write_state({**(state or {}), "txn": txn, "tool": f"mla-seam {__version__}"})
        except OSError as exc:
            self._roll_back_now(journal, exc)
            raise
        self.committed = f"{op} (txn {txn})"
        crash_point("state-written")
        os.unlink(self.journal_path)
        fsync_dir(self.txn_dir)
        crash_point("journal-removed")
        shutil.rmtree(self.txn_dir)
        crash_point("txn-removed")
        return txn

    def _roll_back_now(self, journal: dict, exc: OSError) -> None:
        """Undo a transaction whose write failed, in this process (the journal stays on failure)."""
        with contextlib.suppress(OSError):
            os.unlink(self.state_path.with_name(f".{self.state_path.name}.tmp"))
        try:
            self._roll_back(journal)
        except OSError as again:
            log.error(
                "mla-seam: could not roll back after %s: %s; the journal in %s stays, and the "
                "next run restores the tree from it",
                exc.strerror,
                again,
                self.txn_dir,
            )
            return
        log.warning("mla-seam: %s", self.repairs[-1])

    def _stage(self, txn: str, changes: Sequence[Change]) -> List[dict]:
        """Write backups and new bytes into ``txn/``; return the journal's file entries."""
        if self.txn_dir.exists():
            shutil.rmtree(self.txn_dir)
        entries = []
        for change in changes:
            target = self.tree.root / change.rel
            entry = {
                "path": change.rel,
                "existed": target.exists(),
                "old": change.old_blob,
                "new": change.new_blob,
                "tmp": str(Path(change.rel).with_name(f".{target.name}.mla-seam-{txn}")),
            }
            if entry["existed"]:
                info = target.stat()
                entry.update(mode=info.st_mode & 0o7777, uid=info.st_uid, gid=info.st_gid)
                write_durable(
                    self.txn_dir / "backup" / change.rel, target.read_bytes(), entry["mode"]
                )
            else:  # a new file: the usual mode, and the owner of its folder
                info = target.parent.stat()
                entry.update(mode=0o644, uid=info.st_uid, gid=info.st_gid)
            if change.new is not None:
                write_durable(self.txn_dir / "new" / change.rel, change.new, entry["mode"])
            entries.append(entry)
        for folder in [self.txn_dir, *(p for p in self.txn_dir.rglob("*") if p.is_dir())]:
            fsync_dir(folder)  # every new directory entry, so the backups survive a power loss
        fsync_dir(self.path)
        return entries

    def _install(self, entry: dict, new: Optional[bytes]) -> None:
        """Put one file's new bytes in place (temp copy + ``os.replace``), or delete it."""
        target = self.tree.root / entry["path"]
        if new is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return
        self._put(target, self.tree.root / entry["tmp"], new, entry)

    @staticmethod
    def _put(target: Path, tmp: Path, data: bytes, entry: dict) -> None:
        write_durable(tmp, data, entry["mode"])
        if entry.get("uid") is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(tmp, entry["uid"], entry["gid"])
        os.replace(tmp, target)

    # -- recovery --

    def recover(self) -> List[str]:
        """Finish or roll back an interrupted transaction; return what was repaired.

        Also removes leftover scratch folders and a ``state.json`` that records nothing
        applied (a revert interrupted after its commit point).

        Raises:
            StateCorruptError: a journal exists but cannot be read.
        """
        for leftover in self.path.glob("scratch-*") if self.path.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.path.glob(".*.tmp") if self.path.is_dir() else ():
            leftover.unlink()  # an atomic write that never reached its os.replace
        if self.journal_path.exists():
            journal = self._read_journal()
            state = self.read_state()
            if state is not None and state.get("txn") == journal["txn"]:
                self._finish(journal)
            else:
                self._roll_back(journal)
        elif self.txn_dir.exists():
            shutil.rmtree(self.txn_dir)  # staged only: the tree was never touched
        state = self.read_state()
        if state is not None and not state.get("applied"):
            self.drop_objects()  # a revert that passed its commit point: nothing to keep
            self.write_state(None)
        return self.repairs

    def _read_journal(self) -> dict:
        try:
            journal = json.loads(self.journal_path.read_bytes())
            if not isinstance(journal, dict) or not isinstance(journal.get("files"), list):
                raise ValueError("not a journal")
            return journal
        except ValueError as exc:
            raise StateCorruptError(
                f"the journal of an interrupted run, {self.journal_path}, is unreadable ({exc})",
                f"the original files are in {self.txn_dir / 'backup'}; copy back what you need, "
                f"then delete {self.txn_dir} and run again",
            ) from None

    def _finish(self, journal: dict) -> None:
        for entry in journal["files"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tree.root / entry["tmp"])
        os.unlink(self.journal_path)
        shutil.rmtree(self.txn_dir)
        self.repairs.append(
            f"completed an interrupted {journal.get('op', 'run')} (txn {journal['txn']}), "
            "whose change had already been committed"
        )

    def _roll_back(self, journal: dict) -> None:
        entries = journal["files"]
        current = gitlayer.hash_blobs(self.tree.root, [e["path"] for e in entries])
        restored, kept = 0, []
        for k, entry in enumerate(entries, start=1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tree.root / entry["tmp"])
            blob = current[entry["path"]]
            if blob not in (entry["old"], entry["new"]):
                kept.append(entry["path"])  # changed by someone after the crash: keep it
                continue
            if blob != entry["old"]:
                self._restore(entry)
                restored += 1
            crash_point(f"recover-restored:{k}")
        for folder in sorted({(self.tree.root / e["path"]).parent for e in entries}):
            fsync_dir(folder)
        os.unlink(self.journal_path)
        crash_point("recover-journal-removed")
        shutil.rmtree(self.txn_dir)
        note = (
            f"rolled back an interrupted {journal.get('op', 'run')} (txn {journal['txn']}): "
            f"restored {restored} of {len(entries)} files to their state before it"
        )
        if kept:
            note += f"; left {', '.join(kept)} as they are (changed since the interruption)"
        self.repairs.append(note)

    def _restore(self, entry: dict) -> None:
        target = self.tree.root / entry["path"]
        if not entry["existed"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return
        backup = self.txn_dir / "backup" / entry["path"]
        if entry.get("uid") is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(backup, entry["uid"], entry["gid"])
        try:  # the backup already has the file's mode: renaming it needs no free space
            os.replace(backup, target)
        except OSError:
            self._put(target, self.tree.root / entry["tmp"], backup.read_bytes(), entry)
