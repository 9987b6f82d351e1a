"""The ``apply`` verb: put the MLA adapter and its hook series into a Megatron tree, atomically.

``mla-seam apply [--check | --status | --revert] [--series LINE] [--3way] [--commit] [--json]
[MEGATRON_DIR]``

Working-tree mode (the default), on git checkouts too: apply writes files and never commits, so
git work trees and plain folders (site-packages, an sdist) go through the same code path, the
user's history is never rewritten, and the user commits the change when they want. Commit mode
(``--commit``, git checkouts): one commit per patch plus one for the adapter, like ``git am``
(:mod:`mla_seam.commitmode`). What is applied is recorded in the tree's state folder (see
:mod:`mla_seam.statefolder`), which makes ``--status`` and ``--revert`` work where git cannot.

A run goes: check the bundle -> lock the state folder -> recover an interrupted earlier run ->
select the series (:mod:`mla_seam.selection`: by content, then by version) -> assess the tree
(:mod:`mla_seam.assess`) -> plan the new bytes outside the tree (:mod:`mla_seam.engine`: release,
fork, upgrade or revert) -> one journaled commit (:meth:`StateFolder.commit`) that survives
SIGKILL at any point, HEAD included in commit mode. ``--check`` runs the same code to the last
step before writing, so it exits with the code apply would. Patches apply strictly (no fuzz);
offsets are reported. Applying twice changes nothing.

With no MEGATRON_DIR, apply runs the embedded default job (:mod:`mla_seam.defaultjob`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mla_seam import commitmode, engine, errors, output, paths
from mla_seam.assess import MISSING, POST, PRE, Assessment, apply_problems, assess, revert_problems
from mla_seam.defaultjob import (  # noqa: F401  (DEFAULT_* are part of this verb's interface)
    DEFAULT_CHECKOUT,
    DEFAULT_RELEASE,
    adapter_summary,
    default_tree,
)
from mla_seam.errors import STATUS_EXIT_CODES, InterruptedRunError, SeamError, UsageError
from mla_seam.patching import in_fork_text
from mla_seam.selection import Selection, select_series
from mla_seam.statefolder import StateFolder
from mla_seam.tree import MegatronTree, crash_point

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """One invocation: the tree, the chosen series, the options, and what it reports."""

    tree: MegatronTree
    selection: Selection
    folder: StateFolder
    three_way: bool = False
    commit: bool = False
    dry: bool = False  # --check: everything apply does, up to the first write
    lines: List[str] = dataclasses.field(default_factory=list)
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def series(self):  # -> Series
        return self.selection.series

    def say(self, text: str) -> None:
        self.lines.append(text)


def _short(blob: Optional[str]) -> str:
    return blob[:12] if blob else "none"


def _describe(a: Assessment) -> Dict[str, Any]:
    """The JSON view of an assessment."""
    applier = a.applier
    return {
        "state": a.state,
        "headline": a.headline(),
        "current": a.current,
        "tree": str(a.tree.root),
        "version": a.tree.version,
        "git": a.tree.is_git,
        "series": a.series.name,
        "files": [
            {"path": f.rel, "blob": f.blob, "kind": f.kind, "dirty": f.dirty, "symlink": f.symlink,
             "crlf": f.crlf}
            for f in a.files
        ],  # fmt: skip
        "overlay": [{"path": o.rel, "blob": o.blob, "kind": o.kind} for o in a.overlay],
        "applied_by": (
            None
            if applier is None
            else {
                "source": applier.source,
                "tool": applier.tool,
                "method": applier.method,
                "mode": applier.mode,
                "offsets": applier.offsets,
            }
        ),
    }


def _file_lines(a: Assessment) -> List[str]:
    lines = []
    for f in a.files:
        if f.kind == PRE:
            text = "pristine (pre-image ok" + (", CRLF line endings)" if f.crlf else ")")
        elif f.kind == POST:
            text = "already patched" + (
                f" (by {a.applier.tool})" if a.applier and not a.applier.current else ""
            )
        elif f.kind == MISSING:
            text = "missing"
        elif f.kind == "original":
            text = "pristine (the fork's own content, as before apply)"
        elif a.applier is not None and f.rel in a.applier.files:
            text = f"moved: blob {_short(f.blob)} changed after apply"
        else:
            text = (
                f"moved: blob {_short(f.blob)} is no recorded pre-image of {a.tree.version} "
                "(a fork: the patches decide)"
            )
        extra = [
            w
            for w, on in (
                ("uncommitted changes", f.dirty and f.kind != POST),
                ("symlink", f.symlink),
                ("not writable", not f.writable),
            )
            if on
        ]
        lines.append(f"  {f.rel}: {text}{' [' + ', '.join(extra) + ']' if extra else ''}")
    words = {
        "absent": "absent (apply adds it)",
        "ours": "present (ours)",
        "older": "present (an older mla-seam's)",
        "foreign": "present, NOT ours (conflict)",
    }
    for o in a.overlay:
        older = f" {o.older}" if o.older else ""
        text = (
            words[o.kind].replace("older mla-seam's", f"mla-seam{older}'s")
            if older
            else words[o.kind]
        )
        lines.append(f"  {o.rel}: overlay {text}{' [symlink]' if o.symlink else ''}")
    return lines


def _plan_lines(plan: engine.Plan) -> List[str]:
    lines = [f"  offset: {o}" for o in plan.offsets]
    if plan.offsets:
        lines.append(f"  {len(plan.offsets)} hunk(s) applied at an offset (exact context, no fuzz)")
    lines += [f"  {in_fork_text(h)}: left out" for h in plan.in_fork]
    return lines


def _would(a: Assessment, plan: engine.Plan) -> str:
    if plan.upgrade_from:
        return "upgrade"
    if plan.method == "3way":
        return "merge 3-way"
    if plan.method == "fork" or any(f.kind not in (PRE, POST) for f in a.files if f.in_series):
        return "apply on a fork"
    return "apply"


# --- modes ---------------------------------------------------------------------------------


def do_apply(run: Run) -> int:
    """Apply the series (fresh, on a fork, or upgrading an older one); with ``run.dry``
    (``--check``), stop before the first write and say what apply would do."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    crash_point("preflight-done")
    run.data.update(_describe(a))
    if run.dry:
        run.say(f"check {run.selection.describe()} on {run.tree.describe()}")
        run.lines += _file_lines(a)
    if a.current:
        what = "apply would change nothing" if run.dry else "nothing changed"
        run.say(f"mla-seam: already applied {run.series.name} ({a.counts()}) to {run.tree.root}; "
                f"{what}")  # fmt: skip
        run.data["would" if run.dry else "changed"] = "nothing" if run.dry else []
        return 0
    try:
        if run.commit:
            commitmode.preflight(a)
        problems = apply_problems(a)
        if problems:
            raise problems[0]
        mode = "commit" if run.commit else "worktree"
        plan = engine.apply_plan(a, run.folder, run.three_way, mode)
    except SeamError:
        if run.dry:
            run.say("mla-seam: check failed: apply would refuse (below)")
            run.data["would"] = "refuse"
        raise
    crash_point("post-images-built")
    if run.dry:
        run.lines += engine.step_lines(plan)
        run.data.update(would=_would(a, plan), method=plan.method,
                        changed=sorted(c.rel for c in plan.changes))  # fmt: skip
        run.say(
            f"mla-seam: check passed: {run.series.name} ({a.counts()}) would "
            f"{_would(a, plan)} on {run.tree.root}{' as commits' if run.commit else ''}"
        )
        return 0
    commits = _apply_commits(run, a, plan) if run.commit else []
    if not run.commit:
        run.folder.store_objects(plan.objects)
        run.folder.commit("apply", plan.changes, plan.applied)
    if plan.upgrade_from:
        run.say(f"mla-seam: upgraded {run.tree.root} from {plan.upgrade_from}")
    run.say(
        f"{run.series.name} for megatron-core {run.tree.version}: {len(plan.changes)} file(s) "
        "written"
    )
    if commits:
        run.say(
            f"  {len(commits)} commit(s) on {run.tree.root}: {commits[0][:12]}..{commits[-1][:12]}"
        )
    run.lines += _plan_lines(plan)
    if plan.method == "fork":
        n = len(plan.offsets)
        run.say(
            f"  on a fork: the patches applied strictly to the fork's own bytes ({n} offset"
            f"{'s' if n != 1 else ''}); --revert restores them exactly"
        )
    elif plan.method == "3way":
        run.say(
            f"  on a fork: merged 3-way without conflicts ({', '.join(plan.merged)}; review the "
            "hunks); --revert restores the fork's own bytes exactly"
        )
    if run.tree.is_git and not run.commit:
        log.info(
            "mla-seam: the change is in the working tree, uncommitted; commit it when you want"
        )
    run.say(f"mla-seam: applied {run.series.name} ({a.counts()}) to {run.tree.root}")
    run.data.update(
        state="applied",
        method=plan.method,
        offsets=[str(o) for o in plan.offsets],
        in_fork=[in_fork_text(h) for h in plan.in_fork],
        changed=[c.rel for c in plan.changes],
        commits=commits,
    )
    return 0


def _apply_commits(run: Run, a: Assessment, plan: engine.Plan) -> List[str]:
    ids, head = commitmode.build_commits(a, plan, engine.overlay_bytes(run.series))
    crash_point("commits-built")
    applied = plan.applied
    if head is not None and applied is not None:
        applied = dataclasses.replace(
            applied, mode="commit", commits=ids, head_before=head.old, head_after=head.new
        )
    elif applied is not None:  # every hook already in the fork: nothing to commit
        applied = dataclasses.replace(applied, mode="worktree")
    run.folder.store_objects(plan.objects)
    run.folder.commit("apply", plan.changes, applied, head=head)
    return ids


def do_revert(run: Run) -> int:
    """Give every patched file its pre-apply bytes back and remove the adapter."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    crash_point("preflight-done")
    run.data.update(_describe(a))
    if a.state == "not applied":
        run.say(f"mla-seam: {run.series.name} is not applied to {run.tree.root}; nothing to revert")
        run.data["changed"] = []
        return 0
    problems = revert_problems(a)
    if problems:
        raise problems[0]
    commit_mode = run.commit or (a.applier is not None and a.applier.mode == "commit")
    commits = commitmode.revert_preflight(a) if commit_mode else []
    plan = engine.revert_plan(a, run.folder)
    crash_point("post-images-built")
    if commit_mode:
        changed = [c.rel for c in plan.changes] + list(run.series.overlay)
        ids, head = commitmode.revert_commits(a, commits, changed)
        crash_point("commits-built")
        run.folder.commit("revert", plan.changes, None, head=head)
        run.say(f"  {len(ids)} revert commit(s) on {run.tree.root}")
    else:
        run.folder.commit("revert", plan.changes, None)
    run.folder.drop_objects()
    run.folder.delete_state()
    for rel in plan.kept:
        run.say(
            f"  kept {rel}: it was there before apply, or is committed in HEAD (yours); "
            "remove it yourself if you want it gone"
        )
    record = a.applier.record if a.applier else None
    for hunk in record.in_fork if record is not None else []:
        run.say(f"  left alone: {in_fork_text(hunk)} (the fork's own)")
    run.say(f"mla-seam: reverted {run.series.name} ({a.counts()}) from {run.tree.root}")
    run.data.update(
        state="not applied", changed=[c.rel for c in plan.changes], kept=list(plan.kept)
    )
    return 0


def do_status(run: Run) -> int:
    """Print the state and per-file details; the exit code says the state (STATUS_EXIT_CODES)."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    run.data.update(_describe(a))
    run.say(a.headline())
    run.say(f"  {run.selection.describe()} on {run.tree.describe()}")
    run.lines += _file_lines(a)
    state = a.record
    applied = state.applied if state is not None else None
    if state is not None and applied is not None:
        notes = [] if applied.series_sha256 == run.series.sha256 else ["by another series"]
        if a.state == "not applied":
            notes.append("stale: the files were restored outside mla-seam")
        run.say(
            f"  recorded: {applied.line} applied for {applied.release} by {state.tool} "
            f"({applied.method}, {applied.mode} mode; txn {state.txn})"
            f"{''.join('; ' + n for n in notes)}"
        )
        run.lines += [f"  {in_fork_text(h)}: left out" for h in applied.in_fork]
    elif a.applier is not None and a.applier.source == "released":
        run.say(f"  recognised by content: patched by {a.applier.tool}")
    if a.pending:
        run.say(
            "  an interrupted run left a journal; run `mla-seam apply` with write access to repair"
        )
    code = STATUS_EXIT_CODES[a.state]
    run.data["exit_code"] = code
    if a.state in ("partial", "drifted"):
        log.warning(
            "mla-seam: the tree is %s: `mla-seam apply --check` explains what apply would do",
            a.state,
        )
    return code


MODES: Dict[str, Callable[[Run], int]] = {
    "apply": do_apply,
    "check": do_apply,
    "status": do_status,
    "revert": do_revert,
}


# --- the verb ------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread the way SIGINT raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _interrupted(folder: StateFolder, exc: BaseException) -> InterruptedRunError:
    """Repair after SIGINT/SIGTERM, and say truthfully what state the tree is in."""
    name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
    done = len(folder.repairs)
    repairs = folder.recover()[done:] if folder.locked else []
    if repairs:
        what, hint = "; ".join(repairs), "run the command again if you still want it"
    elif folder.committed:
        what = f"the {folder.committed} had already been committed and is complete"
        hint = "nothing to do: `mla-seam apply --status` shows the state"
    else:
        what, hint = "nothing had been written to the tree", "run the command again if you want it"
    err = InterruptedRunError(f"interrupted by {name}: {what}", hint)
    err.exit_code = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
    return err


def _system_failure(folder: StateFolder, exc: OSError) -> SeamError:
    """An OSError during the run, with what it left in the tree (said only when known)."""
    from mla_seam.cli import os_error  # pylint: disable=import-outside-toplevel

    err = os_error(exc)
    if folder.committed:
        done = f"the {folder.committed} itself is complete (committed before the error)" + (
            "; the next mla-seam run on the tree removes its journal" if folder.pending() else ""
        )
    elif folder.rolled_back:
        done = "the change in progress was rolled back: the tree is as it was before this run"
    elif folder.rolled_back is False or folder.pending():
        done = "the change in progress could not be rolled back here; its journal stays, and " \
            "the next mla-seam run on the tree restores the files"  # fmt: skip
    else:
        done = "nothing had been written to the tree"
    err.hint = f"{done}; {err.hint}"
    return err


def _tree_arg(args: argparse.Namespace) -> Optional[Path]:
    """MEGATRON_DIR as given; an empty or blank one is a usage error (an unset variable)."""
    if args.megatron_dir is None:
        return None
    if not args.megatron_dir.strip():
        raise UsageError(
            "MEGATRON_DIR is empty (an unset shell variable?)",
            "pass the path of a Megatron-LM tree, or leave it out to use ./megatron-lm",
        )
    return Path(args.megatron_dir)


def _check_args(args: argparse.Namespace) -> None:
    if args.series is not None and not args.series.strip():
        raise UsageError(
            "--series is empty (an unset shell variable?)",
            "pass a release line such as core_v0.19, or leave --series out to select the line "
            "by the tree's content",
        )
    if args.three_way and args.mode in ("status", "revert"):
        raise UsageError(
            f"--3way applies a series; it means nothing with --{args.mode}",
            "drop --3way (or use it with apply and --check)",
        )


def _report(run: Optional[Run], args: argparse.Namespace, code: int) -> None:
    if run is None:
        return
    if getattr(args, "json", False):
        output.emit_json({"mode": args.mode, "exit_code": code, **run.data})
        return
    for line in run.lines:
        output.emit(line)


def _execute(args: argparse.Namespace) -> int:
    given = _tree_arg(args)
    _check_args(args)
    paths.check_bundle()  # before anything is written or materialized
    tree = MegatronTree.resolve(given if given is not None else default_tree(args.mode))
    folder = StateFolder(tree)
    run: Optional[Run] = None
    with folder.session(write=args.mode in ("apply", "revert")):
        try:
            crash_point("locked")
            if folder.locked:
                for note in folder.recover():
                    log.warning("mla-seam: repaired: %s", note)
            state = folder.read_state()
            selection = select_series(tree, args.series, state)
            run = Run(tree, selection, folder, args.three_way, args.commit, args.mode == "check")
            if (
                folder.locked
                and state is not None
                and state.schema == 1
                and (state.applied is not None and state.applied.mode == "commit")
            ):
                note = commitmode.finish(assess(tree, selection.series, folder), folder)
                if note:
                    log.warning("mla-seam: repaired: %s", note)
            code = MODES[args.mode](run)
        except SeamError as err:
            _report_error(run, args, err)
            raise
        except OSError as exc:
            err = _system_failure(folder, exc)
            _report_error(run, args, err)
            raise err from None
        except (KeyboardInterrupt, _Terminated) as exc:
            raise _interrupted(folder, exc) from None
    _report(run, args, code)
    if args.mode == "apply" and given is None and code == 0 and not getattr(args, "json", False):
        output.emit(adapter_summary(tree))
    return code


def _report_error(run: Optional[Run], args: argparse.Namespace, err: SeamError) -> None:
    if run is not None and getattr(args, "json", False):
        run.data["error"] = {
            "type": type(err).__name__,
            "message": err.message,
            "hint": err.hint,
            "exit_code": err.exit_code,
        }
        _report(run, args, err.exit_code)
        err.reported = True  # type: ignore[attr-defined]
    elif run is not None:
        _report(run, args, err.exit_code)


def run(args: argparse.Namespace) -> int:
    """Run the verb; SIGTERM is turned into an exception for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return _execute(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _execute(args)
    except _Terminated:  # outside the locked section: nothing was being written
        err = InterruptedRunError("interrupted by SIGTERM", "run the command again if you want it")
        err.exit_code = 128 + signal.SIGTERM
        raise err from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in errors.exit_codes().items())
    return (
        "output:\n"
        "  Results go to stdout (one line each), diagnostics to stderr.\n"
        "  -q, --quiet   no result lines; only warnings and errors on stderr (the exit code\n"
        "                says the outcome; --status -q prints nothing and exits with the state)\n"
        "  --json        one JSON document on stdout instead of result lines, also for errors\n"
        "                (bad arguments included): {\"mode\", \"exit_code\", \"state\", ...,\n"
        "                \"error\": {\"type\", \"message\", \"hint\", \"exit_code\"}}\n"
        "  Piped into `head`, output ends quietly and the exit code is still the real one.\n"
        "\n"
        f"exit codes:\n{codes}\n"
        "  (README.md, section Exit codes, has the same table.)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``apply`` verb to the CLI."""
    parser = subparsers.add_parser(
        "apply",
        help="apply, check, show or revert the MLA adapter series on a Megatron tree",
        description=(
            "Apply the MLA adapter and its hook patches to MEGATRON_DIR, atomically and strictly "
            "(no fuzz); nothing is committed unless --commit. Without MEGATRON_DIR: materialize "
            f"megatron-core {DEFAULT_RELEASE} into ./{DEFAULT_CHECKOUT}, apply, and print the "
            "adapter summary."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        dest="mode",
        action="store_const",
        const="check",
        help="run apply up to its first write and say what it would do; exits with the code "
        "apply would (every other flag counts)",
    )
    mode.add_argument(
        "--status",
        dest="mode",
        action="store_const",
        const="status",
        help="print applied / not applied / partial / drifted with per-file details; the exit "
        "code says the state (0, 21, 22, 14)",
    )
    mode.add_argument(
        "--revert",
        dest="mode",
        action="store_const",
        const="revert",
        help="give every file its bytes from before apply back (verified by blob id) and remove "
        "the adapter; hunks the fork held before apply stay",
    )
    parser.add_argument(
        "--series",
        metavar="LINE",
        help="use this release line (e.g. core_v0.19) instead of the one the tree's content "
        "(or else its version) selects",
    )
    parser.add_argument(
        "--3way",
        dest="three_way",
        action="store_true",
        help="where a fork changed a hunk's context: merge 3-way against the release's own "
        "files (carried by mla-seam: any clone depth, plain folders too); a merge with "
        "conflicts is thrown away, never left in the tree",
    )
    parser.add_argument(
        "--commit",
        action="store_true",
        help="git checkouts: apply as one commit per patch plus one for the adapter (like git "
        "am; a 3-way merge is said in its commit message); with --revert, add revert commits",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of text lines"
    )
    parser.add_argument("megatron_dir", nargs="?", metavar="MEGATRON_DIR", help="the Megatron tree")
    parser.set_defaults(mode="apply", func=run)
