"""The ``mla-seam`` command line: one sub-command per verb module.

Each verb module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.
Errors derived from :class:`~mla_seam.errors.SeamError` become their exit code and a
two-line message on stderr (what went wrong, what to do).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from mla_seam import __version__
from mla_seam.errors import SeamError

log = logging.getLogger("mla_seam")

# Verb modules, in the order `mla-seam --help` lists them. A module missing here is a bug.
VERBS = ("apply", "upstream", "rebase", "drift", "suite")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every verb registered."""
    parser = argparse.ArgumentParser(
        prog="mla-seam",
        description="MLA adapter overlay for Megatron-LM: apply, rebase, drift, suite.",
    )
    parser.add_argument("--version", action="version", version=f"mla-seam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except SeamError as err:
        log.error("mla-seam %s: %s", args.verb, err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("mla-seam %s: interrupted; the tree is left as it was before this run", args.verb)
        return 130
