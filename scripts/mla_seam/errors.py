"""Named exceptions of mla-seam, each with its own process exit code.

Every error says what was wrong and what to do about it. The CLI maps the class to
``exit_code``; tests assert on both the class and the code, so codes never change meaning.
"""

from __future__ import annotations


class SeamError(Exception):
    """Base class: a failure the user can act on. ``hint`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class UsageError(SeamError):
    """Command-line arguments that cannot be acted on."""

    exit_code = 2


class TreeNotFoundError(SeamError):
    """The MEGATRON_DIR given does not exist or is not a directory."""

    exit_code = 3


class NotMegatronTreeError(SeamError):
    """The directory holds no ``megatron/core`` package."""

    exit_code = 4


class UnsupportedVersionError(SeamError):
    """No patch series serves the tree's megatron-core version."""

    exit_code = 5


class PreimageMismatchError(SeamError):
    """A touched file differs from every pre-image the series recorded (upstream moved)."""

    exit_code = 6


class DirtyTreeError(SeamError):
    """Uncommitted user changes overlap a file the series touches."""

    exit_code = 7


class SeriesCorruptError(SeamError):
    """The series on disk disagrees with its manifest, or a patch cannot be parsed."""

    exit_code = 8


class UnsafePathError(SeamError):
    """A patch or overlay path escapes the tree, or a touched path is a symlink."""

    exit_code = 9


class OverlayConflictError(SeamError):
    """An overlay file already exists in the tree with content that is not ours."""

    exit_code = 10


class ReadOnlyTreeError(SeamError):
    """The tree (or the state folder) cannot be written."""

    exit_code = 11


class LockedError(SeamError):
    """Another mla-seam process holds the tree's lock."""

    exit_code = 12


class PatchFailedError(SeamError):
    """A patch does not apply strictly (no fuzz) to a verified pre-image."""

    exit_code = 13


class DriftedTreeError(SeamError):
    """The tree is neither pristine nor patched: edits on top of the series, or a partial state."""

    exit_code = 14


class UpstreamError(SeamError):
    """A release could not be fetched or materialized (unknown tag, registry unreachable)."""

    exit_code = 15


class RebaseError(SeamError):
    """A rebase could not be completed; the user's tree and patches/ are unchanged."""

    exit_code = 16


class DriftFoundError(SeamError):
    """A drift sweep found tags that need work (used as a CI gate)."""

    exit_code = 17


class DeviceError(SeamError):
    """The GPU suite cannot run here (no CUDA device, no Transformer Engine)."""

    exit_code = 18


class StateCorruptError(SeamError):
    """mla-seam's state folder is damaged: state record or journal malformed or failing its
    checksum, or the folder or its lock not what mla-seam made."""

    exit_code = 19


class BundleError(SeamError):
    """mla-seam's own bundle (patches/, overlay/) is missing, or does not match this mla-seam."""

    exit_code = 20


class GitError(SeamError):
    """A git command failed (a broken repository, a ``.git`` file pointing nowhere)."""

    exit_code = 23


class SystemFailureError(SeamError):
    """The operating system refused a read or write (disk full, name too long, I/O error)."""

    exit_code = 24


class IntegrityError(SeamError):
    """Bytes to be written back fail verification (a stored pristine copy or a backup is not the
    recorded blob); nothing was written.

    The message names the tree file and the damaged copy; the hint says how to get the file back
    (delete the copy and run again, ``git checkout``, or the fork commit that has the blob)."""

    exit_code = 27


class GitLockedError(SeamError):
    """A git lock (``index.lock``, a ref's ``.lock``) is held by another git process or left by a
    crashed one; found before anything moved."""

    exit_code = 28


class HeadMovedError(SeamError):
    """Commit mode: HEAD moved away from the series' commits (branch switched, reset, or new
    commits), so they cannot be added, completed or reverted.

    Raised when an interrupted commit-mode run finds HEAD neither where it started nor where it
    was going, and when ``--revert --commit`` finds the series' commits outside HEAD's history."""

    exit_code = 29


class PreimageUnavailableError(SeamError):
    """The release files a 3-way merge or a restore needs are nowhere to be had: not in the
    tree's repository, no megatron-core sdist cached or downloadable, or a moving target's commit
    not fetched; nothing was written.

    The message names the files and blobs; the hint says which commit to fetch (``main``,
    ``dev``) or how to get the sdist onto a machine without network access."""

    exit_code = 30


class InterruptedRunError(SeamError):
    """SIGINT/SIGTERM arrived; the tree was rolled back or completed before exiting."""

    exit_code = 130  # 128 + SIGINT; a SIGTERM sets 143 on the instance


#: Exit codes of ``mla-seam apply --status`` per tree state (errors keep their own codes).
STATUS_EXIT_CODES = {
    "applied": 0,
    "not applied": 21,
    "partial": 22,
    "drifted": DriftedTreeError.exit_code,
}

#: Exit codes of the nightly drift job (``python -m mla_seam.nightly``, ``ci/nightly.sh``) beside
#: :class:`DriftFoundError`'s 17 (upstream drift found); numbered apart from every code above.
NIGHTLY_OVERLAY_BROKE_EXIT = 25
NIGHTLY_JOB_BROKE_EXIT = 26


class GitHubError(SeamError):
    """A call to GitHub failed while the nightly job published (``gh`` missing, a token without
    the permission, GitHub down): the job broke, never drift."""

    exit_code = NIGHTLY_JOB_BROKE_EXIT


#: 128 + SIGPIPE: the reader of our output went away before the command could report.
BROKEN_PIPE_EXIT = 141


def _first_line(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    return doc.replace("``", "`").rstrip(".")


def exit_codes() -> "dict[int, str]":
    """Every exit code of ``mla-seam`` with its meaning (for ``--help`` and the README's table;
    one home: the error classes' docstrings and the constants above)."""
    meanings = {0: "ok; `apply --status`: applied"}
    pending = list(SeamError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.exit_code not in (1, InterruptedRunError.exit_code):
            meanings.setdefault(cls.exit_code, _first_line(cls))
    meanings[STATUS_EXIT_CODES["not applied"]] = "`apply --status`: not applied"
    meanings[STATUS_EXIT_CODES["partial"]] = (
        "`apply --status`: partial (half applied, or an interrupted run left a journal)"
    )
    meanings[NIGHTLY_OVERLAY_BROKE_EXIT] = "nightly job: the overlay broke"
    meanings[NIGHTLY_JOB_BROKE_EXIT] = "nightly job: the job itself broke"
    meanings[130] = "interrupted by SIGINT (143: SIGTERM); the tree was rolled back or completed"
    meanings[BROKEN_PIPE_EXIT] = "stdout closed before the command could report"
    return dict(sorted(meanings.items()))
