"""The ``apply`` verb: put the MLA adapter and its hook series into a Megatron tree, atomically.

``mla-seam apply [--check | --status | --revert] [--series LINE] [--3way] [--commit] [--json]
[MEGATRON_DIR]``

Working-tree mode (the default), on git checkouts too: apply writes files and never commits, so
git work trees and plain folders (site-packages, an sdist) go through the same code path, the
user's history is never rewritten, and the user commits the change when they want. Commit mode
(``--commit``, git checkouts): one commit per patch plus one for the adapter, like ``git am``
(:mod:`mla_seam.commitmode`). What is applied is recorded in the tree's state folder (see
:mod:`mla_seam.tree`), which makes ``--status`` and ``--revert`` work where git cannot help.

A run goes: check the bundle -> lock the state folder -> recover an interrupted earlier run ->
select the series (:mod:`mla_seam.selection`: by content, then by version) -> assess the tree
(:mod:`mla_seam.assess`) -> plan the new bytes outside the tree (:mod:`mla_seam.engine`: release,
fork, upgrade or revert) -> one journaled commit (:meth:`mla_seam.tree.StateFolder.commit`) that
survives SIGKILL at any point. Patches apply strictly (no fuzz); offsets are reported. Applying
twice changes nothing.

With no MEGATRON_DIR, apply runs the embedded default job: materialize megatron-core
:data:`DEFAULT_RELEASE` into ``./megatron-lm`` (or reuse it), apply, and print the adapter's
summary (:func:`adapter_summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from mla_seam import commitmode, engine, output, paths
from mla_seam.assess import (
    MISSING,
    POST,
    PRE,
    Assessment,
    apply_problems,
    assess,
    revert_problems,
)
from mla_seam.errors import (
    STATUS_EXIT_CODES,
    InterruptedRunError,
    SeamError,
    UpstreamError,
    UsageError,
)
from mla_seam.selection import Selection, select_series
from mla_seam.tree import MegatronTree, StateFolder, crash_point

log = logging.getLogger(__name__)

DEFAULT_RELEASE = "0.19.2"
DEFAULT_CHECKOUT = "megatron-lm"  # relative to the current directory
PYTHON_ENV = "MLA_SEAM_PYTHON"  # interpreter for adapter_summary (default: one with torch)


@dataclasses.dataclass
class Run:
    """One invocation: the tree, the chosen series, the options, and what it reports."""

    tree: MegatronTree
    selection: Selection
    folder: StateFolder
    three_way: bool = False
    commit: bool = False
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
            {"path": f.rel, "blob": f.blob, "kind": f.kind, "dirty": f.dirty, "symlink": f.symlink}
            for f in a.files
        ],
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
            text = "pristine (pre-image ok)"
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


def _offset_lines(plan: engine.Plan) -> List[str]:
    offsets = plan.offsets
    lines = [f"  offset: {o}" for o in offsets]
    if offsets:
        lines.append(f"  {len(offsets)} hunk(s) applied at an offset (exact context, no fuzz)")
    return lines


# --- modes ---------------------------------------------------------------------------------


def do_apply(run: Run) -> int:
    """Apply the series (fresh, on a fork, or upgrading an older one); return the exit code."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    crash_point("preflight-done")
    run.data.update(_describe(a))
    if a.current:
        run.say(
            f"mla-seam: already applied {run.series.name} ({a.counts()}) to {run.tree.root}; "
            "nothing changed"
        )
        run.data["changed"] = []
        return 0
    problems = apply_problems(a)
    if problems:
        raise problems[0]
    plan = engine.apply_plan(a, run.folder, run.three_way, "commit" if run.commit else "worktree")
    crash_point("post-images-built")
    if run.commit:
        _apply_commits(run, a, plan)
    else:
        run.folder.store_objects(plan.objects)
        run.folder.commit("apply", plan.changes, plan.record)
    if plan.upgrade_from:
        run.say(f"mla-seam: upgraded {run.tree.root} from {plan.upgrade_from}")
    run.say(
        f"{run.series.name} for megatron-core {run.tree.version}: {len(plan.changes)} file(s) "
        "written"
    )
    run.lines += _offset_lines(plan)
    if plan.method == "fork":
        n = len(plan.offsets)
        run.say(
            f"  on a fork: the patches applied strictly to the fork's own bytes ({n} offset"
            f"{'s' if n != 1 else ''}); --revert restores them exactly"
        )
    elif plan.method == "3way":
        run.say(
            "  on a fork: merged 3-way without conflicts (review the hunks); --revert restores "
            "the fork's own bytes exactly"
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
        changed=[c.rel for c in plan.changes],
        commits=plan.record["applied"].get("commits", []),
    )
    return 0


def _apply_commits(run: Run, a: Assessment, plan: engine.Plan) -> None:
    sources = {
        rel: a.view.canonical(rel) if a.files and rel in a.raw_blobs else b""
        for rel in run.series.touched
    }
    if any(f.kind == POST for f in a.files):
        raise UsageError(
            "--commit applies to a tree where nothing is applied yet; this one is patched "
            f"by {a.applier.tool if a.applier else 'mla-seam'}",
            "revert it first (mla-seam apply --revert [--commit]), then apply --commit",
        )
    adapter = engine.overlay_bytes(run.series)
    ids = commitmode.build_commits(a, plan, run.folder, sources, adapter)
    run.folder.store_objects(plan.objects)
    head = plan.record["applied"]["head_before"]
    run.folder.commit("apply", plan.changes, plan.record)
    paths_ = sorted(set(run.series.touched) | set(run.series.overlay))
    commitmode.move_head(a, head, ids[-1], paths_, f"apply {run.series.name}")
    run.say(f"  {len(ids)} commit(s) on {run.tree.root}: {ids[0][:12]}..{ids[-1][:12]}")


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
    plan = engine.revert_plan(a, run.folder)
    crash_point("post-images-built")
    if run.commit or (a.applier is not None and a.applier.mode == "commit"):
        _revert_commits(run, a, plan)
    else:
        run.folder.commit("revert", plan.changes, {"applied": None})
    run.folder.drop_objects()
    run.folder.write_state(None)
    for rel in plan.kept:
        run.say(
            f"  kept {rel}: it was there before apply, or is committed in HEAD (yours); "
            "remove it yourself if you want it gone"
        )
    run.say(f"mla-seam: reverted {run.series.name} ({a.counts()}) from {run.tree.root}")
    run.data.update(
        state="not applied", changed=[c.rel for c in plan.changes], kept=list(plan.kept)
    )
    return 0


def _revert_commits(run: Run, a: Assessment, plan: engine.Plan) -> None:
    ids = commitmode.revert_commits(a, plan)
    head = plan.record["reverted"]["head_before"]
    run.folder.commit("revert", plan.changes, {"applied": None})
    paths_ = sorted({c.rel for c in plan.changes} | set(run.series.overlay))
    commitmode.move_head(a, head, ids[-1], paths_, f"revert {run.series.name}")
    run.say(f"  {len(ids)} revert commit(s) on {run.tree.root}")


def do_status(run: Run) -> int:
    """Print the state and per-file details; the exit code says the state (STATUS_EXIT_CODES)."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    run.data.update(_describe(a))
    run.say(a.headline())
    run.say(f"  {run.selection.describe()} on {run.tree.describe()}")
    run.lines += _file_lines(a)
    applied = (a.record or {}).get("applied")
    if applied:
        notes = [] if applied.get("series_sha256") == run.series.sha256 else ["by another series"]
        if a.state == "not applied":
            notes.append("stale: the files were restored outside mla-seam")
        run.say(
            f"  recorded: {applied.get('line')} applied for {applied.get('release')} by "
            f"{a.record.get('tool', 'mla-seam')} ({applied.get('method', 'exact')}, "
            f"{applied.get('mode', 'worktree')} mode; txn {a.record.get('txn')})"
            f"{''.join('; ' + n for n in notes)}"
        )
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


def do_check(run: Run) -> int:
    """Report what apply would do, without writing; raise apply's first problem, if any."""
    a = assess(run.tree, run.series, run.folder, run.selection.blobs)
    run.data.update(_describe(a))
    run.say(f"check {run.selection.describe()} on {run.tree.describe()}")
    run.lines += _file_lines(a)
    if a.current:
        run.say(
            f"mla-seam: check: {run.series.name} is already applied to {run.tree.root}; "
            "apply would change nothing"
        )
        run.data["would"] = "nothing"
        return 0
    problems: List[Exception] = list(apply_problems(a))
    upgrading = a.applier is not None and a.state == "applied"
    if upgrading:
        run.say(f"  apply would upgrade it from {a.applier.tool}")
    elif not a.symlinks:
        lines, patch_problems = engine.simulate(a)
        run.lines += lines
        problems += patch_problems
    if problems:
        run.say(f"mla-seam: check failed: {len(problems)} problem(s); apply would refuse")
        run.data["would"] = "refuse"
        raise problems[0]
    fork = any(f.kind not in (PRE, POST) for f in a.files if f.in_series)
    run.data["would"] = "upgrade" if upgrading else "apply on a fork" if fork else "apply"
    run.say(
        f"mla-seam: check passed: {run.series.name} ({a.counts()}) would apply to "
        f"{run.tree.root}{' (a fork: strictly, at the offsets above)' if fork else ''}"
    )
    return 0


MODES: Dict[str, Callable[[Run], int]] = {
    "apply": do_apply,
    "check": do_check,
    "status": do_status,
    "revert": do_revert,
}


# --- the verb ------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread the way SIGINT raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _default_tree(mode: str) -> Path:
    """``./megatron-lm``: reused if it holds DEFAULT_RELEASE, materialized by apply if absent."""
    dest = Path.cwd() / DEFAULT_CHECKOUT
    if dest.exists():
        version = MegatronTree.resolve(dest).version
        if version != DEFAULT_RELEASE:
            raise UsageError(
                f"./{DEFAULT_CHECKOUT} holds megatron-core {version}, not the default "
                f"{DEFAULT_RELEASE}",
                f"pass the tree explicitly (mla-seam apply ./{DEFAULT_CHECKOUT}), or move it away "
                "to let apply materialize the default release",
            )
        return dest
    if mode != "apply":
        raise UsageError(
            f"no MEGATRON_DIR given and ./{DEFAULT_CHECKOUT} does not exist",
            f"pass the tree to work on, or run `mla-seam apply` to create ./{DEFAULT_CHECKOUT}",
        )
    try:
        from mla_seam import upstream  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise UpstreamError(
            f"cannot materialize releases here: {exc}", "pass MEGATRON_DIR"
        ) from None
    log.info(
        "mla-seam: materializing megatron-core %s into ./%s", DEFAULT_RELEASE, DEFAULT_CHECKOUT
    )
    return Path(upstream.get(DEFAULT_RELEASE, into=dest))


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
    paths.check_bundle()  # before anything is written or materialized
    tree = MegatronTree.resolve(given if given is not None else _default_tree(args.mode))
    folder = StateFolder(tree)
    run: Optional[Run] = None
    with folder.session(write=args.mode in ("apply", "revert")):
        try:
            crash_point("locked")
            if folder.locked:
                for note in folder.recover():
                    log.warning("mla-seam: repaired: %s", note)
            selection = select_series(tree, args.series, folder.read_state())
            run = Run(tree, selection, folder, args.three_way, args.commit)
            if folder.locked:
                note = commitmode.finish(assess(tree, selection.series, folder), folder)
                if note:
                    log.warning("mla-seam: repaired: %s", note)
            code = MODES[args.mode](run)
        except SeamError as err:
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
            raise
        except (KeyboardInterrupt, _Terminated) as exc:
            raise _interrupted(folder, exc) from None
    _report(run, args, code)
    if args.mode == "apply" and given is None and code == 0 and not getattr(args, "json", False):
        output.emit(adapter_summary(tree))
    return code


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


def _summary_python() -> str:
    """``$MLA_SEAM_PYTHON``, else the first of this interpreter and ``python3`` on PATH that can
    import torch (the adapter needs it), else this interpreter (which then reports why)."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        return override
    candidates = [sys.executable] + [p for p in [shutil.which("python3")] if p]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    for python in candidates:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if (
                subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
                == 0
            ):
                return python
    return sys.executable


#: What the main job prints: the adapter's one-line summary for DeepSeek-V2-Lite attention (YaRN,
#: q_lora_rank=None), with the backend decided on this machine. Runs in the tree's interpreter.
_SUMMARY_PROBE = """\
from megatron.core.transformer import mla_adapter
from megatron.core.transformer.transformer_config import MLATransformerConfig

config = MLATransformerConfig(
    num_layers=1, hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, rope_type="yarn",
    rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707, qk_layernorm=True,
)
mla_adapter.resolve_attention_backend(config, "te" if mla_adapter.HAVE_TE else "local")
print(mla_adapter.describe(config))
"""


def adapter_summary(tree: Union[MegatronTree, os.PathLike]) -> str:
    """The adapter's summary line for DeepSeek-V2-Lite attention, computed in a subprocess.

    The interpreter comes from :func:`_summary_python`; the tree goes first on PYTHONPATH. A
    failed import yields the reason instead of an exception.
    """
    root = tree.root if isinstance(tree, MegatronTree) else Path(tree)
    python = _summary_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = _SUMMARY_PROBE
    try:
        proc = subprocess.run(
            [python, "-c", code],
            cwd=str(root),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"adapter summary unavailable: {exc}"
    if proc.returncode == 0:
        return proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit {proc.returncode}"
    return (
        f"adapter summary unavailable ({python}): {reason} "
        f"(set {PYTHON_ENV} to a python that has torch and the Megatron dependencies)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``apply`` verb to the CLI."""
    parser = subparsers.add_parser(
        "apply",
        help="apply, check, show or revert the MLA adapter series on a Megatron tree",
        description=(
            "Apply the MLA adapter and its hook patches to MEGATRON_DIR, atomically and strictly "
            "(no fuzz); nothing is committed. Without MEGATRON_DIR: materialize megatron-core "
            f"{DEFAULT_RELEASE} into ./{DEFAULT_CHECKOUT}, apply, and print the adapter summary."
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        dest="mode",
        action="store_const",
        const="check",
        help="report what apply would do, write nothing; exit 0 only if it would succeed",
    )
    mode.add_argument(
        "--status",
        dest="mode",
        action="store_const",
        const="status",
        help="print applied / not applied / partial / drifted with per-file details",
    )
    mode.add_argument(
        "--revert",
        dest="mode",
        action="store_const",
        const="revert",
        help="undo the series byte-exactly and remove the adapter file",
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
        help="on a fork whose changes reach a hunk's context: try a 3-way merge (git checkouts; "
        "a merge with conflicts is rolled back, never left in the tree)",
    )
    parser.add_argument(
        "--commit",
        action="store_true",
        help="git checkouts: apply as one commit per patch plus one for the adapter (like git "
        "am); with --revert, add revert commits",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of text lines"
    )
    parser.add_argument("megatron_dir", nargs="?", metavar="MEGATRON_DIR", help="the Megatron tree")
    parser.set_defaults(mode="apply", func=run)
