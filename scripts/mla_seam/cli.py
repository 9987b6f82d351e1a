"""The ``mla-seam`` command line: one sub-command per verb module.

Each verb module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.

:func:`main` is the one place where failures become exit codes; no Python traceback reaches a
user. Errors derived from :class:`~mla_seam.errors.SeamError` become their exit code and a
two-line message on stderr (what went wrong, what to do); an ``OSError`` (disk full, a name too
long, permission) and a failed git command are wrapped into such an error here; a closed stdout
(``| head``) silences further output; Ctrl-C at any point, start-up included, exits 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Iterator, List, NoReturn, Optional, Sequence

from mla_seam import __version__
from mla_seam.errors import (
    BROKEN_PIPE_EXIT,
    GitError,
    GitLockedError,
    ReadOnlyTreeError,
    SeamError,
    SystemFailureError,
    UsageError,
)

log = logging.getLogger("mla_seam")

# Verb modules, in the order `mla-seam --help` lists them. A module missing here is a bug.
VERBS = ("apply", "upstream", "rebase", "drift", "suite")

_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class _Parser(argparse.ArgumentParser):
    """Argument errors become a UsageError (exit 2, and a JSON document with ``--json``)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(f"{message}", f"see `{self.prog} --help`")


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` / ``-q`` on ``parser``; below the top level they default to "not given"."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging", **default)
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no result lines on stdout, only warnings and errors on stderr (the exit code says "
        "the outcome; --json output is still printed)",
        **default,
    )


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every sub-command parser below ``parser``, at any depth."""
    for action in parser._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every verb registered."""
    parser = _Parser(
        prog="mla-seam",
        description="MLA adapter overlay for Megatron-LM: apply, rebase, drift, suite.",
    )
    parser.add_argument("--version", action="version", version=f"mla-seam {__version__}")
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERBS:
        try:
            module = importlib.import_module(f"mla_seam.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mla_seam.{name}":
                raise
            continue
        module.register(sub)
    for child in _subparsers(parser):
        if not any(a.dest in ("verbose", "quiet") for a in child._actions):
            _verbosity(child, top=False)
    return parser


def os_error(exc: OSError) -> SeamError:
    """The named error for an OSError that reached the CLI."""
    where = exc.filename or ""
    what = exc.strerror or str(exc)
    text = f"{what}: {where}" if where else what
    if exc.errno in _READ_ONLY_ERRNOS:
        return ReadOnlyTreeError(
            text, "make the tree writable for this user, or run as its owner; nothing was lost"
        )
    hints = {
        errno.ENOSPC: "free some space on that file system and run again",
        errno.ENAMETOOLONG: "move the tree to a shorter path (mla-seam adds a few path "
        "components below it for its state folder)",
        errno.EDQUOT: "free some of your disk quota and run again",
    }
    return SystemFailureError(
        f"{text} ({errno.errorcode.get(exc.errno or 0, 'OSError')})",
        hints.get(exc.errno or 0, "check the file system (dmesg, df) and run again"),
    )


def _lost_cwd() -> Optional[SeamError]:
    """The error for a current directory that no longer exists (deleted under the shell)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        shell = os.environ.get("PWD", "")
        where = f" {shell}" if shell and not os.path.exists(shell) else ""  # the shell's word
        return SystemFailureError(
            f"the current directory{where} no longer exists (deleted while the shell was in it)",
            "cd to an existing directory and run the command again; nothing was written",
        )
    return None


def git_error(exc: Exception) -> SeamError:
    """The named error for a git command that failed unexpectedly."""
    command = " ".join(
        str(a) for a in getattr(exc, "command", [])[:6] if not str(a).startswith("-c")
    )
    stderr = str(getattr(exc, "stderr", "") or exc).strip().strip("'").strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = (
        [ln for ln in lines if "fatal:" in ln or "error:" in ln] or lines or [type(exc).__name__]
    )
    what = fatal[0].removeprefix("stderr: ")
    text = f"git failed ({command or 'git'}): {what}"
    if "dubious ownership" in stderr:
        where = next((ln.split("'")[1] for ln in lines if ln.count("'") >= 2), "THE_REPOSITORY")
        return GitError(
            text,
            "the repository belongs to another user and git refuses to work in it for you: run "
            f"as its owner, or mark it safe (git config --global --add safe.directory {where}); "
            "mla-seam changed nothing",
        )
    if ".lock': File exists" in stderr or ".lock': file exists" in stderr.lower():
        return GitLockedError(
            text,
            "another git process is working in this repository, or one crashed and left the "
            "lock: wait for it, or remove the stale lock file named above; mla-seam changed "
            "nothing",
        )
    return GitError(
        text, "check the repository (git status, git fsck); mla-seam left the tree as it was"
    )


def _report(verb: str, err: SeamError, args: Optional[argparse.Namespace]) -> int:
    if args is not None and getattr(args, "json", False) and not getattr(err, "reported", False):
        from mla_seam import output  # pylint: disable=import-outside-toplevel

        output.emit_json(
            {
                "error": {
                    "type": type(err).__name__,
                    "message": err.message,
                    "hint": err.hint,
                    "exit_code": err.exit_code,
                },
                "exit_code": err.exit_code,
            }
        )
    log.error("mla-seam %s: %s", verb, err)
    return err.exit_code


def _json_wanted(argv: List[str]) -> argparse.Namespace:
    """A stand-in for the parsed arguments when parsing failed: is ``--json`` among them?"""
    return argparse.Namespace(json="--json" in argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    words = list(argv) if argv is not None else sys.argv[1:]
    verb = (words[:1] or ["?"])[0]
    args: Optional[argparse.Namespace] = None
    try:
        from mla_seam import output  # pylint: disable=import-outside-toplevel
        from mla_seam.tree import crash_point  # pylint: disable=import-outside-toplevel

        crash_point("startup")
        parser = build_parser()
        try:
            args = parser.parse_args(words)
        except UsageError as err:
            return _report(verb, err, _json_wanted(words))
        verb = args.verb
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        logging.getLogger().setLevel(level)
        output.set_quiet(bool(args.quiet))
        import git  # pylint: disable=import-outside-toplevel

        try:
            return int(args.func(args) or 0)
        except git.GitCommandError as exc:
            return _report(verb, git_error(exc), args)
    except SeamError as err:
        return _report(verb, err, args)
    except BrokenPipeError:
        from mla_seam import output  # pylint: disable=import-outside-toplevel,reimported

        output.handle_broken_pipe()
        return BROKEN_PIPE_EXIT
    except OSError as exc:
        return _report(verb, _lost_cwd() or os_error(exc), args)
    except KeyboardInterrupt:
        log.error("mla-seam %s: interrupted; the tree is left as it was before this run", verb)
        return 130
