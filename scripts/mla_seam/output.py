"""The one place mla-seam writes results to stdout: text lines, or one JSON document.

Results go to stdout, diagnostics (logging) to stderr; ``-q`` drops the result lines (never a
JSON document, which was asked for explicitly). When the reader of stdout goes away
(``mla-seam apply --status | head -1``), the command still runs to its end and exits with its
real code: the first failed write points stdout at ``/dev/null`` and later writes are dropped.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

_closed = False
_quiet = False


def set_quiet(quiet: bool) -> None:
    """``-q``: drop result lines from now on (JSON documents are still written)."""
    global _quiet  # pylint: disable=global-statement
    _quiet = quiet


def _drop_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that no later write or flush fails again."""
    global _closed  # pylint: disable=global-statement
    _closed = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _write(text: str) -> None:
    if _closed:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        _drop_stdout()


def emit(text: str) -> None:
    """Write one result line (or several, joined by newlines) to stdout (not with ``-q``)."""
    if not _quiet:
        _write(text.rstrip("\n") + "\n")


def emit_json(obj: Any) -> None:
    """Write ``obj`` as one JSON document (sorted keys, indent 2) to stdout."""
    _write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def stdout_closed() -> bool:
    """Whether a write found stdout's reader gone (output since then was dropped)."""
    return _closed


def handle_broken_pipe() -> None:
    """Called by the CLI when a BrokenPipeError escaped a verb: silence stdout for good."""
    _drop_stdout()
