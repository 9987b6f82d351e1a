"""mla-seam's state folder in a tree: lock, state record, pristine store and the commit journal.

The folder is ``<git-dir>/mla-seam/`` in a git work tree, ``<root>/.mla-seam/`` otherwise::

    lock            flock(2) target; holds the pid of the process that has it
    state.json      the state record (schema :class:`mla_seam.record.State`, with a checksum)
    objects/<blob>  the bytes every touched file had before apply, named by their git blob id;
                    verified against that id whenever they are read back (--revert restores them)
    scratch-<id>/   post-images being built (removed when done; leftovers removed on start)
    txn/            exists only while a change is being committed
      backup/<rel>  original bytes of every file the change rewrites or deletes
      new/<rel>     new bytes of every file the change writes
      journal.json  written last (atomically): the transaction is now in progress

Commit protocol (:meth:`StateFolder.commit`), each step named for ``MLA_SEAM_CRASH_AT``:

1. ``txn-staged``: backups and new bytes written to ``txn/`` and fsynced.
2. ``journal-written``: ``txn/journal.json`` (the files, and in commit mode the HEAD move)
   replaced in atomically, folder fsynced.
3. ``replaced:<k>``: file k copied to a temp name next to its target (mode and owner kept),
   fsynced and ``os.replace``-d over it (or deleted).
4. ``state-written``: ``state.json`` (carrying the transaction id) replaced in atomically. This
   is the commit point.
5. Commit mode only: ``head-moved`` (``update-ref`` from the old to the new commit, checked
   against the old value), ``index-reset`` (the touched paths' index entries follow HEAD).
6. ``journal-removed``: the journal deleted; 7. ``txn-removed``: ``txn/`` deleted.

Recovery (:meth:`StateFolder.recover`, on every run before anything else): a journal whose id
``state.json`` records is finished (HEAD moved and the index entries reset where that had not
happened, ``recover-head-moved``; then the journal deleted); any other journal is rolled back:
each file's backup is checked against the file's recorded blob id and restored (temp copy +
``os.replace``, steps ``recover-restored:<k>``), files that did not exist are deleted, then the
journal (``recover-journal-removed``) and ``txn/`` go. Both directions are idempotent, so a crash
during recovery is repaired by the next run. A ``txn/`` without a journal had not touched the
tree and is just deleted.

A write that fails before the commit point (disk full, a name too long) is rolled back at once,
in the same process, before the error is reported; when even that fails, the journal stays for
the next run. A failure after it (HEAD could not move) leaves the journal, and the next run
finishes the transaction.

One module on purpose (~620 lines, 40 of them this protocol): the commit steps and their recovery
are two halves of one crash-point list, and the kill trials (tests/integrity.py) hold them together.
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
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import git
from mla_seam import __version__, gitlayer, record
from mla_seam.errors import (
    GitError,
    GitLockedError,
    HeadMovedError,
    IntegrityError,
    LockedError,
    ReadOnlyTreeError,
    SeamError,
    StateCorruptError,
)
from mla_seam.record import Applied, HeadMove, Journal, JournalEntry, State
from mla_seam.series import json_bytes
from mla_seam.tree import (
    Change,
    MegatronTree,
    crash_point,
    fsync_dir,
    replace_atomic,
    write_durable,
)

log = logging.getLogger(__name__)


def _short(blob: Optional[str]) -> str:
    return blob[:12] if blob else "none"


class StateFolder:
    """The tree's state folder: lock, ``state.json``, scratch space and the commit journal."""

    def __init__(self, tree: MegatronTree) -> None:
        self.tree = tree
        self.path = tree.state_dir
        self.locked = False
        self.repairs: List[str] = []  # what recovery did in this run, for the user
        self.committed: Optional[str] = None  # "<op> (txn <id>)" once this run passed step 4
        self.rolled_back: Optional[bool] = None  # a failed write of this run: undone in-process?
        self._fd: Optional[int] = None

    def pending(self) -> bool:
        """Whether an interrupted transaction left its journal."""
        return self.journal_path.exists()

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

    @property
    def objects_dir(self) -> Path:
        return self.path / "objects"

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
                if exc.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
                    raise self._bad_lock() from None
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
        if not os.path.isfile(self.lock_path):
            os.close(fd)
            raise self._bad_lock()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self.locked = fd, True

    def _bad_lock(self) -> StateCorruptError:
        return StateCorruptError(
            f"mla-seam's lock {self.lock_path} is not a plain file (a folder, a device or a "
            "link): it is not what mla-seam makes there",
            f"move it away (mv {self.lock_path} {self.lock_path}.aside) and run again; the rest "
            "of the state folder is kept",
        )

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

    def damaged(self, problem: str) -> StateCorruptError:
        """The error for a state record that fails its schema or checksum, with the way back."""
        where = "git checkout -- FILE" if self.tree.is_git else "reinstalling megatron-core"
        return StateCorruptError(
            f"state record damaged: {self.state_path}: {problem}",
            f"mla-seam wrote nothing. Move the record aside (mv {self.state_path} "
            f"{self.state_path}.damaged) and run `mla-seam apply --status`: a tree patched "
            "exactly by a release's series is recognised by its content. A fork's files come "
            f"back with {where} (`git log --find-object=BLOB` names a fork commit), or from the "
            f"pristine copies in {self.objects_dir}, named by their blob id",
        )

    def read_state(self) -> Optional[State]:
        """The state record, or ``None`` when there is none.

        Raises:
            StateCorruptError: the record is not JSON, a field is malformed, or its checksum
                does not match (``state record damaged``, with the way back).
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise self.damaged(f"not a file ({exc.strerror})") from None
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise self.damaged(f"not JSON ({exc})") from None
        try:
            return record.parse_state(value, json_bytes)
        except record.RecordError as exc:
            raise self.damaged(str(exc)) from None

    def write_state(self, applied: Optional[Applied], txn: str = "") -> None:
        """Replace ``state.json`` atomically, with its checksum."""
        state = State(
            schema=record.STATE_SCHEMA,
            applied=applied,
            txn=txn,
            tool=f"mla-seam {__version__}",
        )
        value = record.to_json(state)
        value["checksum"] = record.checksum(value, json_bytes)
        replace_atomic(self.state_path, json_bytes(value))

    def delete_state(self) -> None:
        """Forget the state record (nothing is applied)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)

    # -- pristine bytes --

    def object_path(self, blob: str) -> Path:
        """Where the store keeps ``blob``."""
        return self.objects_dir / blob

    def store_objects(self, objects: Dict[str, bytes]) -> None:
        """Keep ``blob id -> bytes`` in ``objects/`` (durable; an equal object is kept)."""
        for blob, data in objects.items():
            target = self.object_path(blob)
            with contextlib.suppress(OSError):
                if target.read_bytes() == data:
                    continue
            replace_atomic(target, data)

    def load_object(self, blob: str) -> Optional[bytes]:
        """The stored bytes of ``blob`` as they are on disk (unverified), or ``None``."""
        try:
            return self.object_path(blob).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
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

    def commit(
        self,
        op: str,
        changes: Sequence[Change],
        applied: Optional[Applied],
        head: Optional[HeadMove] = None,
    ) -> str:
        """Apply ``changes`` to the tree all-or-nothing, record ``applied`` (``None``: nothing is
        applied any more) and, in commit mode, move HEAD as ``head`` says; return the txn id.

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
        journal = Journal(
            schema=2, txn=txn, files=entries, op=op, pid=os.getpid(), head=head
        )  # fmt: skip
        try:
            replace_atomic(self.journal_path, json_bytes(record.to_json(journal)))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.journal_path.with_name(f".{self.journal_path.name}.tmp"))
            shutil.rmtree(self.txn_dir, ignore_errors=True)
            raise
        try:
            crash_point("journal-written")
            for k, (entry, change) in enumerate(zip(entries, changes), start=1):
                self._install(entry, change.new)
                crash_point(f"replaced:{k}")
            for folder in sorted({(self.tree.root / e.path).parent for e in entries}):
                fsync_dir(folder)
            self.write_state(applied, txn)
        except OSError as exc:
            self._roll_back_now(journal, exc)
            raise
        self.committed = f"{op} (txn {txn})"
        crash_point("state-written")
        if head is not None:
            self._move_head(journal, recovering=False)
        os.unlink(self.journal_path)
        fsync_dir(self.txn_dir)
        crash_point("journal-removed")
        shutil.rmtree(self.txn_dir)
        crash_point("txn-removed")
        return txn

    def _roll_back_now(self, journal: Journal, exc: OSError) -> None:
        """Undo a transaction whose write failed, in this process (the journal stays on failure)."""
        with contextlib.suppress(OSError):
            os.unlink(self.state_path.with_name(f".{self.state_path.name}.tmp"))
        try:
            self._roll_back(journal)
        except (OSError, SeamError) as again:
            self.rolled_back = False
            log.error(
                "mla-seam: could not roll back after %s: %s; the journal in %s stays, and the "
                "next run restores the tree from it",
                exc.strerror,
                again,
                self.txn_dir,
            )
            return
        self.rolled_back = True
        log.warning("mla-seam: %s", self.repairs[-1])

    def _stage(self, txn: str, changes: Sequence[Change]) -> List[JournalEntry]:
        """Write backups and new bytes into ``txn/``; return the journal's file entries."""
        if self.txn_dir.exists():
            shutil.rmtree(self.txn_dir)
        entries = []
        for change in changes:
            target = self.tree.root / change.rel
            existed = target.exists()
            tmp = str(Path(change.rel).with_name(f".{target.name}.mla-seam-{txn}"))
            if existed:
                info = target.stat()
                mode, uid, gid = info.st_mode & 0o7777, info.st_uid, info.st_gid
                write_durable(self.txn_dir / "backup" / change.rel, target.read_bytes(), mode)
            else:  # a new file: the usual mode, and the owner of its folder
                info = target.parent.stat()
                mode, uid, gid = 0o644, info.st_uid, info.st_gid
            if change.new is not None:
                write_durable(self.txn_dir / "new" / change.rel, change.new, mode)
            entries.append(
                JournalEntry(change.rel, existed, change.old_blob, change.new_blob, tmp, mode,
                             uid, gid)  # fmt: skip
            )
        for folder in [self.txn_dir, *(p for p in self.txn_dir.rglob("*") if p.is_dir())]:
            fsync_dir(folder)  # every new directory entry, so the backups survive a power loss
        fsync_dir(self.path)
        return entries

    def _install(self, entry: JournalEntry, new: Optional[bytes]) -> None:
        """Put one file's new bytes in place (temp copy + ``os.replace``), or delete it."""
        target = self.tree.root / entry.path
        if new is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return
        self._put(target, self.tree.root / entry.tmp, new, entry)

    @staticmethod
    def _put(target: Path, tmp: Path, data: bytes, entry: JournalEntry) -> None:
        write_durable(tmp, data, entry.mode)
        if entry.uid is not None and entry.gid is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(tmp, entry.uid, entry.gid)
        os.replace(tmp, target)

    # -- HEAD (commit mode) --

    def _move_head(self, journal: Journal, recovering: bool) -> None:
        """Move HEAD as the journal says (after the commit point) and reset the index entries.

        Idempotent: HEAD already at the new commit is left there.

        Raises:
            GitLockedError: a git lock is held (the journal stays; the next run finishes).
            HeadMovedError: HEAD is neither where the transaction started nor where it goes.
            GitError: git failed otherwise (the journal stays).
        """
        head = journal.head
        assert head is not None and self.tree.repo is not None
        repo = self.tree.repo
        current = gitlayer.head_commit(repo)
        if current not in (head.old, head.new):
            raise HeadMovedError(
                f"the {journal.op} --commit (txn {journal.txn}) had written its files and was "
                f"to move HEAD from {_short(head.old)} to {_short(head.new)}; HEAD is now "
                f"{_short(current)} (moved by something else meanwhile)",
                f"the {journal.op} stays in the working tree, uncommitted; its commits are "
                f"{_short(head.old)}..{_short(head.new)}: `git cherry-pick "
                f"{head.old}..{head.new}` puts them on the current branch",
            )
        locks = gitlayer.held_locks(repo)
        if locks:
            raise self._git_locked(journal, locks)
        try:
            if current == head.old:
                gitlayer.move_head(repo, head.new, head.old, f"mla-seam: {head.reason}")
            if recovering:
                crash_point("recover-head-moved")
            else:
                crash_point("head-moved")
            gitlayer.reset_index(repo, head.new, head.paths)
        except git.GitCommandError as exc:
            detail = str(exc.stderr or exc).strip().strip("'").strip().splitlines()
            raise GitError(
                f"git failed while moving HEAD to the {journal.op}'s last commit "
                f"{_short(head.new)}: {detail[-1] if detail else exc}",
                f"the {journal.op} itself is complete (files and state record written, txn "
                f"{journal.txn}); once git works here again, any mla-seam run on the tree "
                "finishes it (HEAD and the index entries of the touched files)",
            ) from None
        if not recovering:
            crash_point("index-reset")

    def _git_locked(self, journal: Journal, locks: Sequence[Path]) -> GitLockedError:
        return GitLockedError(
            f"git's lock {', '.join(map(str, locks))} exists: another git process is working "
            f"in this repository, or one crashed and left it; the {journal.op} --commit (txn "
            f"{journal.txn}) has written its files but HEAD must still move to "
            f"{_short(journal.head.new if journal.head else None)}",
            "wait for the other git command to end; if none is running, remove the stale lock "
            f"(rm {locks[0]}); then any mla-seam run on the tree finishes the {journal.op}",
        )

    # -- recovery --

    def recover(self) -> List[str]:
        """Finish or roll back an interrupted transaction; return what was repaired.

        Also removes leftover scratch folders and a ``state.json`` that records nothing
        applied (a revert interrupted after its commit point).

        Raises:
            StateCorruptError: a journal or the state record exists but is damaged.
            IntegrityError: a backup to restore fails verification (nothing restored).
            GitLockedError, GitError: a commit-mode HEAD move cannot be finished yet.
            HeadMovedError: HEAD moved since the interruption (the rest is finished first).
        """
        for leftover in self.path.glob("scratch-*") if self.path.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.path.glob(".*.tmp") if self.path.is_dir() else ():
            leftover.unlink()  # an atomic write that never reached its os.replace
        moved: Optional[HeadMovedError] = None
        if self.journal_path.exists():
            journal = self._read_journal()
            state = self.read_state()
            if state is not None and state.txn == journal.txn:
                moved = self._finish(journal, state)
            else:
                self._roll_back(journal)
        elif self.txn_dir.exists():
            shutil.rmtree(self.txn_dir)  # staged only: the tree was never touched
        state = self.read_state()
        if state is not None and state.applied is None:
            self.drop_objects()  # a revert that passed its commit point: nothing to keep
            self.delete_state()
        if moved is not None:
            raise moved
        return self.repairs

    def _read_journal(self) -> Journal:
        try:
            value = json.loads(self.journal_path.read_bytes())
            return record.parse(Journal, value)
        except (ValueError, OSError) as exc:
            raise StateCorruptError(
                f"the journal of an interrupted run, {self.journal_path}, is unreadable ({exc})",
                f"the original files are in {self.txn_dir / 'backup'}; copy back what you need, "
                f"then delete {self.txn_dir} and run again",
            ) from None

    def _finish(self, journal: Journal, state: State) -> Optional[HeadMovedError]:
        moved = None
        if journal.head is not None:
            try:
                self._move_head(journal, recovering=True)
            except HeadMovedError as exc:
                moved = exc
                if state.applied is not None:  # keep a consistent record: applied, uncommitted
                    self.write_state(dataclasses.replace(
                        state.applied,
                        mode="worktree",
                        commits=[],
                        head_before=None,
                        head_after=None,
                        ),  # fmt: skip
                        state.txn,
                    )
        for entry in journal.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tree.root / entry.tmp)
        os.unlink(self.journal_path)
        shutil.rmtree(self.txn_dir)
        note = (
            f"completed an interrupted {journal.op} (txn {journal.txn}), whose change had "
            "already been committed"
        )
        if journal.head is not None and moved is None:
            note += f"; HEAD is at its last commit {_short(journal.head.new)}"
        self.repairs.append(note)
        return moved

    def _roll_back(self, journal: Journal) -> None:
        entries = journal.files
        current = {e.path: self._blob_of(self.tree.root / e.path) for e in entries}
        restored, kept = 0, []
        for k, entry in enumerate(entries, start=1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tree.root / entry.tmp)
            blob = current[entry.path]
            if blob not in (entry.old, entry.new):
                kept.append(entry.path)  # changed by someone after the crash: keep it
                continue
            if blob != entry.old:
                self._restore(entry)
                restored += 1
            crash_point(f"recover-restored:{k}")
        for folder in sorted({(self.tree.root / e.path).parent for e in entries}):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)
        os.unlink(self.journal_path)
        crash_point("recover-journal-removed")
        shutil.rmtree(self.txn_dir)
        note = (
            f"rolled back an interrupted {journal.op} (txn {journal.txn}): "
            f"restored {restored} of {len(entries)} files to their state before it"
        )
        if kept:
            note += f"; left {', '.join(kept)} as they are (changed since the interruption)"
        self.repairs.append(note)

    @staticmethod
    def _blob_of(path: Path) -> Optional[str]:
        try:
            return gitlayer.blob_id(path.read_bytes()) if path.is_file() else None
        except FileNotFoundError:
            return None

    def _restore(self, entry: JournalEntry) -> None:
        target = self.tree.root / entry.path
        if not entry.existed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return
        backup = self.txn_dir / "backup" / entry.path
        data = backup.read_bytes() if backup.is_file() else None
        got = gitlayer.blob_id(data) if data is not None else None
        if got != entry.old:
            raise IntegrityError(
                f"the backup of {entry.path} ({backup}) fails verification: "
                f"{'it is missing' if got is None else f'its bytes are blob {_short(got)}'}, "
                f"not the recorded {_short(entry.old)}; {entry.path} was left as it is",
                "restore the file yourself (git checkout -- FILE in a checkout, or from your "
                f"copy of the release), then delete {self.txn_dir} and run again",
            )
        if entry.uid is not None and entry.gid is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(backup, entry.uid, entry.gid)
        try:  # the backup already has the file's mode: renaming it needs no free space
            os.replace(backup, target)
        except OSError:
            self._put(target, self.tree.root / entry.tmp, data or b"", entry)
