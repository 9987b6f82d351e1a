"""The bad-input sweep of ``mla-seam apply``: state records, journals, the pristine store, the
bundle, arguments, git states and trees, each damaged or odd in one way (:func:`rows`).

Every row runs the real CLI in a forked child (:func:`integrity.run`) on a small real tree and
must end with its exit code and message, no traceback and nothing lost (the tree's files, HEAD,
history and index as before, no transaction left behind). A few rows are odd inputs that must
work; for those, the tree must end exactly as the finished run leaves it: a success is checked,
never taken at its word.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import integrity
from integrity import ADAPTER, INFO, LINE, LM, MLA, REPO_ROOT, TC, TL, git, state_dir
from mla_seam import record
from mla_seam.series import json_bytes

DELETE = object()

# Template trees (integrity.Templates keys) a row starts from, and the state a finished run
# leaves for rows that must work.
STARTS = {
    "pristine": ("release", "apply", "worktree"),
    "applied": ("release", "revert", "worktree"),
    "applied-commit": ("release", "revert", "commit"),
    "plain": ("plain", "apply", "worktree"),
    "plain-applied": ("plain", "revert", "worktree"),
    "fork": ("fork", "apply", "worktree"),
}


@dataclasses.dataclass
class Ctx:
    """What a row's setup works with; setup returns the arguments after ``mla-seam``."""

    tree: Path
    tmp: Path
    env: Dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    cwd: Optional[Path] = None
    remove_cwd: bool = False
    bundle_root: Optional[Path] = None

    def bundle(self) -> Path:
        """A private copy of the real bundle, made the one the CLI uses."""
        if self.bundle_root is None:
            self.bundle_root = self.tmp / "bundle"
            for part in ("patches", "overlay"):
                shutil.copytree(REPO_ROOT / part, self.bundle_root / part)
            self.env["MLA_SEAM_ROOT"] = str(self.bundle_root)
        return self.bundle_root

    def line(self) -> Path:
        return self.bundle() / "patches" / LINE

    @property
    def state(self) -> Path:
        return state_dir(self.tree) / "state.json"


@dataclasses.dataclass(frozen=True)
class Row:
    """One bad (or odd) input: where it starts, how it is made, what must come out."""

    id: str
    kind: str  # state | journal | store | bundle | args | git | tree
    start: str
    setup: Callable[[Ctx], List[str]]
    code: int
    message: str
    works: Optional[Tuple[str, str, str]] = None  # the Templates key whose end state is wanted


def apply_args(*flags: str) -> Callable[[Ctx], List[str]]:
    return lambda ctx: ["apply", *flags, str(ctx.tree)]


# --- the state record ----------------------------------------------------------------------


def _set(doc: Any, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if value is DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


def _state_edit(path: Sequence[str], value: Any, schema: int, command: str) -> Callable:
    """Edit one field of the state record; ``schema`` 2: the checksum recomputed (only the
    field's own check can tell), 1: an old record without checksum, 0: checksum left stale."""

    def setup(ctx: Ctx) -> List[str]:
        doc = json.loads(ctx.state.read_text())
        _set(doc, path, value)
        if schema == 1:
            doc["schema"] = 1
            doc.pop("checksum", None)
        elif schema == 2 and path[0] not in ("checksum", "schema"):
            doc["checksum"] = record.checksum(doc, json_bytes)
        ctx.state.write_text(json.dumps(doc))
        return ["apply", *([command] if command else []), str(ctx.tree)]

    return setup


def _rename_file_key(new: str) -> Tuple[Sequence[str], Any]:
    return ("applied", "files"), {"__rename__": new}


MALFORMED: List[Tuple[Sequence[str], Any]] = [
    (("schema",), 3), (("schema",), "2"), (("schema",), None), (("schema",), []),
    (("txn",), 5), (("txn",), ["a"]), (("txn",), "not-hex!"),
    (("tool",), 7), (("tool",), None), (("tool",), {"x": 1}),
    (("applied",), 5), (("applied",), "x"), (("applied",), []), (("applied",), True),
    (("applied", "line"), 5), (("applied", "line"), ""), (("applied", "line"), "../core_v0.16"),
    (("applied", "line"), None), (("applied", "line"), DELETE), (("applied", "line"), "a/b"),
    (("applied", "release"), 5), (("applied", "release"), None), (("applied", "release"), []),
    (("applied", "series_sha256"), "abc"), (("applied", "series_sha256"), 5),
    (("applied", "series_sha256"), DELETE), (("applied", "series_sha256"), "A" * 64),
    (("applied", "files"), "x"), (("applied", "files"), []), (("applied", "files"), {}),
    (("applied", "files"), 5), (("applied", "files"), DELETE),
    (("applied", "files", LM), "x"), (("applied", "files", LM), 5),
    (("applied", "files", LM), []), (("applied", "files", LM), None),
    (("applied", "files", LM), {}), (("applied", "files", LM, "pre"), "zz"),
    (("applied", "files", LM, "pre"), 5), (("applied", "files", LM, "pre"), None),
    (("applied", "files", MLA, "post"), "g" * 40), (("applied", "files", MLA, "post"), DELETE),
    (("applied", "files", TL, "pre"), "1" * 39),
    (("applied", "files", "../../etc/passwd"), {"pre": "a" * 40, "post": "b" * 40}),
    (("applied", "files", "/abs/x.py"), {"pre": "a" * 40, "post": "b" * 40}),
    (("applied", "files", ".git/config"), {"pre": "a" * 40, "post": "b" * 40}),
    (("applied", "files", "megatron/./x.py"), {"pre": "a" * 40, "post": "b" * 40}),
    (("applied", "overlay"), ["x"]), (("applied", "overlay"), "x"), (("applied", "overlay"), 5),
    (("applied", "overlay", ADAPTER), 5), (("applied", "overlay", ADAPTER), "nothex"),
    (("applied", "overlay", "../adapter.py"), "a" * 40),
    (("applied", "method"), 5), (("applied", "method"), "magic"), (("applied", "method"), None),
    (("applied", "mode"), "commit"), (("applied", "mode"), 5), (("applied", "mode"), "x"),
    (("applied", "offsets"), "many"), (("applied", "offsets"), 5.5),
    (("applied", "offsets"), -1), (("applied", "offsets"), True), (("applied", "offsets"), None),
    (("applied", "overlay_before"), "x"), (("applied", "overlay_before"), []),
    (("applied", "overlay_before"), {ADAPTER: 5}), (("applied", "overlay_before"), {"../x": None}),
    (("applied", "commits"), "x"), (("applied", "commits"), [5]),
    (("applied", "commits"), ["nothex"]), (("applied", "head_before"), 5),
    (("applied", "head_before"), "zz"), (("applied", "head_after"), []),
    (("applied", "in_fork"), "x"), (("applied", "in_fork"), [5]),
    (("applied", "in_fork"), [{"patch": 5, "file": LM, "hunk": 1}]),
    (("applied", "in_fork"), [{"patch": "p", "file": "../x", "hunk": 1}]),
    (("applied", "in_fork"), [{"patch": "p", "file": LM, "hunk": 0}]),
    (("applied", "in_fork"), [{"patch": "p", "file": LM}]),
    (("applied", "merged"), "x"), (("applied", "merged"), [5]),
]  # fmt: skip

# Valid-looking values, checksum left as it was: only the checksum can tell.
TAMPERED: List[Tuple[Sequence[str], Any]] = [
    (("applied", "files", LM, "pre"), "0" * 40),
    (("applied", "line"), "core_v0.16"),
    (("applied", "method"), "fork"),
    (("applied", "offsets"), 3),
    (("tool",), "mla-seam 9.9.9"),
    (("checksum",), DELETE),
    (("checksum",), "0" * 64),
    (("applied",), None),
]

WHOLE_FILE = [
    ("list", b"[]"), ("number", b"5"), ("null", b"null"), ("empty", b""), ("truncated", b"{"),
    ("binary", b"\xff\xfe\x00garbage"), ("no-schema", b"{}"), ("nul-bytes", b"\0" * 64),
]  # fmt: skip


def _whole(data: bytes) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        ctx.state.write_bytes(data)
        return ["apply", "--revert", str(ctx.tree)]

    return setup


def _state_is_folder(ctx: Ctx) -> List[str]:
    data = ctx.state.read_bytes()
    ctx.state.unlink()
    ctx.state.mkdir()
    (ctx.state / "keep").write_bytes(data)
    return ["apply", "--status", str(ctx.tree)]


def _slug(path: Sequence[str], value: Any) -> str:
    short = {LM: "LM", MLA: "MLA", TC: "TC", TL: "TL", ADAPTER: "adapter"}
    text = ".".join(short.get(p, p) for p in path)
    shown = "delete" if value is DELETE else json.dumps(value)
    for long, brief in ((LM, "LM"), ("a" * 40, "a40"), ("b" * 40, "b40"), ("A" * 64, "A64")):
        shown = shown.replace(long, brief)
    return f"{text}={shown}".replace(" ", "").replace('"', "")


def state_rows() -> List[Row]:
    rows = []
    for path, value in MALFORMED:
        for schema in (2, 1):
            if path[0] in ("schema", "checksum") and schema == 1:
                continue
            start = "applied"
            command = "--revert"
            if path[1:2] in (("commits",), ("head_before",), ("head_after",)):
                start = "applied-commit"
            rows.append(Row(
                f"state-v{schema}-{_slug(path, value)}", "state", start,
                _state_edit(path, value, schema, command), 19, "state record damaged",
            ))  # fmt: skip
    for path, value in TAMPERED:
        rows.append(Row(
            f"state-checksum-{_slug(path, value)}", "state", "applied",
            _state_edit(path, value, 0, "--revert"), 19, "checksum",
        ))  # fmt: skip
    for command in ("", "--status", "--check"):
        rows.append(Row(
            f"state-{command.strip('-') or 'apply'}-offsets-many", "state", "applied",
            _state_edit(("applied", "offsets"), "many", 2, command), 19, "state record damaged",
        ))  # fmt: skip
    rows += [
        Row(f"state-file-{name}", "state", "applied", _whole(data), 19, "state record damaged")
        for name, data in WHOLE_FILE
    ]
    rows.append(Row("state-file-is-a-folder", "state", "applied", _state_is_folder, 19,
                    "state record damaged"))  # fmt: skip
    return rows


# --- the journal ---------------------------------------------------------------------------


def _journal(ctx: Ctx) -> dict:
    blob = integrity.git(ctx.tree, "rev-parse", f"HEAD:{LM}").strip()
    return {
        "schema": 2, "txn": "ab12cd34ab12cd34", "op": "revert", "pid": 1, "head": None,
        "files": [{"path": LM, "existed": True, "old": blob, "new": blob,
                   "tmp": str(Path(LM).with_name(".x.mla-seam-ab12")), "mode": 420,
                   "uid": 0, "gid": 0}],
    }  # fmt: skip


JOURNAL_EDITS: List[Tuple[str, Callable[[dict], None]]] = [
    ("files-string", lambda j: j.update(files="x")),
    ("files-number", lambda j: j.update(files=[5])),
    ("path-escapes", lambda j: j["files"][0].update(path="../x.py")),
    ("path-absolute", lambda j: j["files"][0].update(path="/etc/passwd")),
    ("path-in-dot-git", lambda j: j["files"][0].update(path=".git/config")),
    ("existed-string", lambda j: j["files"][0].update(existed="yes")),
    ("old-not-hex", lambda j: j["files"][0].update(old="zz")),
    ("new-number", lambda j: j["files"][0].update(new=5)),
    ("tmp-escapes", lambda j: j["files"][0].update(tmp="../../x")),
    ("mode-negative", lambda j: j["files"][0].update(mode=-1)),
    ("mode-too-big", lambda j: j["files"][0].update(mode=99999)),
    ("uid-string", lambda j: j["files"][0].update(uid="root")),
    ("head-bad-commit", lambda j: j.update(head={"old": "zz", "new": "a" * 40, "paths": []})),
    ("head-number", lambda j: j.update(head=5)),
    ("head-paths-escape", lambda j: j.update(head={"old": "a" * 40, "new": "b" * 40,
                                                   "paths": ["../x"]})),  # fmt: skip
    ("txn-empty", lambda j: j.update(txn="")),
    ("txn-number", lambda j: j.update(txn=5)),
    ("schema-unknown", lambda j: j.update(schema=9)),
    ("files-missing", lambda j: j.pop("files")),
    ("list", lambda j: j.clear()),
]


def _journal_edit(edit: Callable[[dict], None]) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        journal = _journal(ctx)
        edit(journal)
        txn = state_dir(ctx.tree) / "txn"
        txn.mkdir(parents=True)
        (txn / "journal.json").write_text(json.dumps(journal if journal else []))
        return ["apply", "--status", str(ctx.tree)]

    return setup


def _journal_backup(damage: str) -> Callable[[Ctx], List[str]]:
    """A real interrupted revert whose backup of a file was then damaged."""

    def setup(ctx: Ctx) -> List[str]:
        killed = integrity.crash(["--revert", str(ctx.tree)], "replaced:2")
        assert killed.signal == 9, killed.text
        backups = sorted((state_dir(ctx.tree) / "txn" / "backup").rglob("*.py"))
        target = backups[0]
        if damage == "appended":
            target.write_bytes(target.read_bytes() + b"# damaged\n")
        else:
            target.unlink()
        return ["apply", "--status", str(ctx.tree)]

    return setup


def journal_rows() -> List[Row]:
    rows = [
        Row(f"journal-{name}", "journal", "applied", _journal_edit(edit), 19, "is unreadable")
        for name, edit in JOURNAL_EDITS
    ]
    rows += [
        Row(f"journal-backup-{damage}", "journal", "applied", _journal_backup(damage), 27,
            "fails verification")  # fmt: skip
        for damage in ("appended", "missing")
    ]
    return rows


# --- the pristine store ---------------------------------------------------------------------


def _object(ctx: Ctx, rel: str) -> Path:
    blob = json.loads(ctx.state.read_text())["applied"]["files"][rel]["pre"]
    return state_dir(ctx.tree) / "objects" / blob


def _store(rel: str, damage: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        path = _object(ctx, rel)
        data = path.read_bytes()
        if damage == "appended":
            path.write_bytes(data + b"# tampered\n")
        elif damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "emptied":
            path.write_bytes(b"")
        elif damage == "swapped":
            path.write_bytes(_object(ctx, MLA if rel != MLA else TC).read_bytes())
        elif damage == "one-byte":
            path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
        elif damage == "deleted":
            path.unlink()
        elif damage == "folder":
            path.unlink()
            path.mkdir()
        elif damage == "store-is-a-file":
            shutil.rmtree(path.parent)
            path.parent.write_text("not a folder\n")
        return ["apply", "--revert", str(ctx.tree)]

    return setup


def store_rows() -> List[Row]:
    rows = []
    for start in ("applied", "plain-applied"):
        for rel in (LM, TL):
            for damage in ("appended", "truncated", "emptied", "swapped", "one-byte"):
                rows.append(Row(
                    f"store-{start}-{Path(rel).stem}-{damage}", "store", start,
                    _store(rel, damage), 27, "fails verification",
                ))  # fmt: skip
        for damage in ("deleted", "folder", "store-is-a-file"):
            rows.append(Row(
                f"store-{start}-{damage}", "store", start, _store(TL, damage), 0, "reverted",
                works=STARTS[start],
            ))  # fmt: skip
    return rows


# --- the bundle ------------------------------------------------------------------------------


def _manifest(edit: Callable[[dict], None]) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        path = ctx.line() / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return ["apply", str(ctx.tree)]

    return setup


def _bundle_file(action: Callable[[Ctx], None], *args: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        action(ctx)
        return ["apply", *args, str(ctx.tree)]

    return setup


def _patch0(ctx: Ctx) -> Path:
    return sorted(ctx.line().glob("0001-*.patch"))[0]


BUNDLE_MANIFEST: List[Tuple[str, Callable[[dict], None], int, str]] = [
    ("schema-7", lambda m: m.update(schema=7), 8, "schema 7"),
    ("line-number", lambda m: m.update(line=5), 8, "manifest needs 'line'"),
    ("releases-empty", lambda m: m.update(releases=[]), 8, "manifest needs 'line'"),
    ("releases-string", lambda m: m.update(releases="0.19.2"), 8, "manifest needs 'line'"),
    ("upstream-list", lambda m: m.update(upstream=[]), 8, "'upstream' must be an object"),
    ("patches-empty", lambda m: m.update(patches=[]), 8, "must be a non-empty list"),
    ("patches-string", lambda m: m.update(patches="x"), 8, "must be a non-empty list"),
    ("patch-sha256-wrong", lambda m: m["patches"][0].update(sha256="0" * 64), 8, "sha256"),
    ("patch-name-escapes", lambda m: m["patches"][0].update(name="../x.patch"), 8,
     "bad patch file name"),
    ("patch-files-empty", lambda m: m["patches"][0].update(files=[]), 8, "the manifest says"),
    ("files-empty", lambda m: m.update(files={}), 8, "manifest 'files' lists"),
    ("files-image-bad-pre", lambda m: m["files"][MLA][0].update(pre="zz"), 8,
     "malformed image entry"),
    ("files-path-escapes", lambda m: m["files"].update({"../x.py": m["files"].pop(MLA)}), 8,
     "manifest 'files' lists"),
    ("overlay-not-hex", lambda m: m.update(overlay={ADAPTER: "nothex"}), 20,
     "from different mla-seam versions"),
    ("overlay-escapes", lambda m: m.update(overlay={"../adapter.py": "a" * 40}), 20,
     "from different mla-seam versions"),
]  # fmt: skip


def bundle_rows() -> List[Row]:
    rows = [
        Row(f"bundle-manifest-{name}", "bundle", "pristine", _manifest(edit), code, message)
        for name, edit, code, message in BUNDLE_MANIFEST
    ]
    files: List[Tuple[str, Callable[[Ctx], None], int, str, str, Tuple[str, ...]]] = [
        ("patch-edited", lambda c: _patch0(c).write_bytes(_patch0(c).read_bytes() + b" "), 8,
         "sha256", "pristine", ()),
        ("patch-missing", lambda c: _patch0(c).unlink(), 8, "missing", "pristine", ()),
        ("patch-extra", lambda c: (c.line() / "9999-extra.patch").write_text("x"), 8,
         "not in the series", "pristine", ()),
        ("series-missing", lambda c: (c.line() / "series").unlink(), 8, "'series' file",
         "pristine", ()),
        ("series-reordered", lambda c: (c.line() / "series").write_text(
            "".join(reversed((c.line() / "series").read_text().splitlines(True)))), 8,
         "order", "pristine", ()),
        ("manifest-not-json", lambda c: (c.line() / "manifest.json").write_text("{"), 8,
         "not valid JSON", "pristine", ()),
        ("manifest-missing", lambda c: (c.line() / "manifest.json").unlink(), 8,
         "manifest.json is missing", "pristine", ()),
        ("overlay-edited", lambda c: (c.bundle() / "overlay" / ADAPTER).write_bytes(b"# x\n"),
         20, "does not match", "pristine", ()),
        ("overlay-missing", lambda c: (c.bundle() / "overlay" / ADAPTER).unlink(), 20,
         "is missing", "pristine", ()),
        ("no-line-folders", lambda c: [shutil.rmtree(p) for p in
                                       (c.bundle() / "patches").iterdir() if p.is_dir()], 20,
         "holds no release line", "pristine", ()),
        ("no-bundle", lambda c: shutil.rmtree(c.bundle() / "patches"), 20, "bundle is missing",
         "pristine", ()),
    ]  # fmt: skip
    rows += [
        Row(f"bundle-{name}", "bundle", start, _bundle_file(action, *args), code, message)
        for name, action, code, message, start, args in files
    ]
    return rows


# --- arguments -----------------------------------------------------------------------------


def _args(*words: str) -> Callable[[Ctx], List[str]]:
    return lambda ctx: [w.replace("{tree}", str(ctx.tree)).replace("{tmp}", str(ctx.tmp))
                        for w in words]  # fmt: skip


def _make(kind: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        target = ctx.tmp / "arg"
        if kind == "file":
            target.write_text("not a tree\n")
        elif kind == "empty-dir":
            target.mkdir()
        elif kind == "loop":
            target.symlink_to(target)
        elif kind == "dangling":
            target.symlink_to(ctx.tmp / "nowhere")
        return ["apply", str(target)]

    return setup


def _deleted_cwd(ctx: Ctx) -> List[str]:
    gone = ctx.tmp / "gone"
    gone.mkdir()
    ctx.cwd = gone
    ctx.env["PWD"] = str(gone)
    ctx.remove_cwd = True
    return ["apply", "--status"]


def _no_dir_here(ctx: Ctx) -> List[str]:
    ctx.cwd = ctx.tmp
    return ["apply", "--status"]


ARG_ROWS: List[Tuple[str, Callable[[Ctx], List[str]], int, str]] = [
    ("empty-path", _args("apply", ""), 2, "MEGATRON_DIR is empty"),
    ("blank-path", _args("apply", "   "), 2, "MEGATRON_DIR is empty"),
    ("no-such-path", _args("apply", "{tmp}/no such tree"), 3, "does not exist"),
    ("path-is-a-file", _make("file"), 3, "is not a directory"),
    ("path-is-an-empty-dir", _make("empty-dir"), 4, "holds no megatron/core"),
    ("path-is-a-symlink-loop", _make("loop"), 3, "does not exist"),
    ("path-is-a-dangling-symlink", _make("dangling"), 3, "does not exist"),
    ("path-too-deep", _args("apply", "{tree}/megatron/core/transformer"), 4,
     "holds no megatron/core"),
    ("series-empty", _args("apply", "--series", "", "{tree}"), 2, "--series is empty"),
    ("series-blank", _args("apply", "--series", "  ", "{tree}"), 2, "--series is empty"),
    ("series-unknown", _args("apply", "--series", "core_v0.42", "{tree}"), 2,
     "no such release line"),
    ("series-path", _args("apply", "--series", "../patches", "{tree}"), 2,
     "no such release line"),
    ("series-check-empty", _args("apply", "--check", "--series", "", "{tree}"), 2,
     "--series is empty"),
    ("check-and-revert", _args("apply", "--check", "--revert", "{tree}"), 2, "not allowed with"),
    ("status-and-revert", _args("apply", "--status", "--revert", "{tree}"), 2,
     "not allowed with"),
    ("3way-with-revert", _args("apply", "--3way", "--revert", "{tree}"), 2,
     "--3way applies a series"),
    ("3way-with-status", _args("apply", "--3way", "--status", "{tree}"), 2,
     "--3way applies a series"),
    ("unknown-flag", _args("apply", "--bogus", "{tree}"), 2, "unrecognized arguments"),
    ("two-trees", _args("apply", "{tree}", "{tree}"), 2, "unrecognized arguments"),
    ("json-unknown-flag", _args("apply", "--json", "--bogus"), 2, '"exit_code": 2'),
    ("json-conflicting-modes", _args("apply", "--json", "--check", "--status", "{tree}"), 2,
     '"type": "UsageError"'),
    ("json-missing-tree", _args("apply", "--json", "{tmp}/nope"), 3, '"exit_code": 3'),
    ("unknown-verb", _args("aply", "{tree}"), 2, "invalid choice"),
    ("no-verb", _args(), 2, "required"),
    ("status-without-dir", _no_dir_here, 2, "./megatron-lm does not exist"),
    ("deleted-working-directory", _deleted_cwd, 24, "no longer exists"),
]  # fmt: skip


def arg_rows() -> List[Row]:
    return [Row(f"args-{name}", "args", "pristine", setup, code, message)
            for name, setup, code, message in ARG_ROWS]  # fmt: skip


# --- git states ----------------------------------------------------------------------------


def _touch(*parts: str, args: Sequence[str] = ("--commit",)) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        path = ctx.tree.joinpath(".git", *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return ["apply", *args, str(ctx.tree)]

    return setup


def _git_then(*commands: Sequence[str], args: Sequence[str] = ()) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        for command in commands:
            git(ctx.tree, *command)
        return ["apply", *args, str(ctx.tree)]

    return setup


def _edit(rel: str, text: str, stage: bool = False, commit: bool = False,
          args: Sequence[str] = ()) -> Callable[[Ctx], List[str]]:  # fmt: skip

    def setup(ctx: Ctx) -> List[str]:
        with open(ctx.tree / rel, "a", encoding="utf-8") as handle:
            handle.write(text)
        if stage or commit:
            git(ctx.tree, "add", rel)
        if commit:
            git(ctx.tree, "commit", "-q", "-m", f"edit {rel}")
        return ["apply", *args, str(ctx.tree)]

    return setup


def _no_commits(ctx: Ctx) -> List[str]:
    shutil.rmtree(ctx.tree / ".git")
    git(ctx.tree, "init", "-q")
    return ["apply", "--commit", str(ctx.tree)]


def _dot_git(content: Optional[str]) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        shutil.rmtree(ctx.tree / ".git")
        if content is None:
            (ctx.tree / ".git").mkdir()
        else:
            (ctx.tree / ".git").write_text(content)
        return ["apply", str(ctx.tree)]

    return setup


def _owned_by_another_user(ctx: Ctx) -> List[str]:
    for dirpath, dirnames, filenames in os.walk(ctx.tree):
        for name in dirnames + filenames + [""]:
            os.lchown(os.path.join(dirpath, name), 65534, 65534)
    ctx.env["HOME"] = str(ctx.tmp)  # no safe.directory from the developer's own config
    return ["apply", str(ctx.tree)]


def _crlf_committed(ctx: Ctx) -> List[str]:
    path = ctx.tree / LM
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    git(ctx.tree, "commit", "-q", "-am", "fork: LM with CRLF line endings")
    return ["apply", str(ctx.tree)]


GIT_ROWS: List[Tuple[str, str, Callable[[Ctx], List[str]], int, str]] = [
    ("index-lock-commit", "pristine", _touch("index.lock"), 28, "index.lock exists"),
    ("head-lock-commit", "pristine", _touch("HEAD.lock"), 28, "HEAD.lock exists"),
    ("branch-lock-commit", "pristine", _touch("refs", "heads", "main.lock"), 28,
     "main.lock exists"),
    ("packed-refs-lock-commit", "pristine", _touch("packed-refs.lock"), 28,
     "packed-refs.lock exists"),
    ("index-lock-check-commit", "pristine", _touch("index.lock", args=("--check", "--commit")),
     28, "index.lock exists"),
    ("index-lock-revert-commit", "applied-commit", _touch("index.lock", args=("--revert",)), 28,
     "index.lock exists"),
    ("no-commits-commit", "pristine", _no_commits, 2, "repository without commits"),
    ("dot-git-file-to-nowhere", "pristine", _dot_git("gitdir: /nonexistent/worktrees/x\n"), 23,
     "is not a usable git work tree"),
    ("dot-git-file-garbage", "pristine", _dot_git("garbage\n"), 23, "usable git work tree"),
    ("dot-git-empty-folder", "pristine", _dot_git(None), 23, "usable git work tree"),
    ("owned-by-another-user", "pristine", _owned_by_another_user, 23, "safe.directory"),
    ("dirty-touched-file", "pristine", _edit(MLA, "# mine\n"), 7, "uncommitted changes"),
    ("staged-touched-file", "pristine", _edit(TC, "# mine\n", stage=True), 7,
     "uncommitted changes"),
    ("later-commit-on-series-file", "applied-commit",
     _edit(MLA, "# later\n", commit=True, args=("--revert",)), 14, "edited after apply"),
    ("series-commits-reset-soft-away", "applied-commit",
     _git_then(("reset", "-q", "--soft", "HEAD~9"), args=("--revert",)), 29,
     "not in the history of HEAD"),
    ("revert-commit-on-worktree-apply", "applied", _args("apply", "--revert", "--commit",
                                                         "{tree}"), 2,
     "applied in working-tree mode"),
    ("commit-on-applied-tree", "applied", _args("apply", "--commit", "{tree}"), 0,
     "already applied"),
    ("untracked-foreign-adapter", "pristine", _edit(ADAPTER, "# someone's\n"), 10,
     "not mla-seam's adapter"),
]  # fmt: skip

GIT_WORKS: List[Tuple[str, str, Callable[[Ctx], List[str]], str, Tuple[str, str, str]]] = [
    ("index-lock-worktree-mode", "pristine", _touch("index.lock", args=()), "applied core_v0.19",
     STARTS["pristine"]),
    ("detached-head-commit", "pristine",
     _git_then(("checkout", "-q", "--detach"), args=("--commit",)), "commit(s) on",
     ("release", "apply", "commit")),
    ("unrelated-later-commit-revert", "applied-commit",
     _git_then(("commit", "-q", "--allow-empty", "-m", "unrelated"), args=("--revert",)),
     "revert commit(s)", None),
    ("crlf-committed-hook-file", "pristine", _crlf_committed, "applied core_v0.19", None),
]  # fmt: skip


def git_rows() -> List[Row]:
    rows = [Row(f"git-{name}", "git", start, setup, code, message)
            for name, start, setup, code, message in GIT_ROWS]  # fmt: skip
    rows += [
        Row(f"git-{name}", "git", start, setup, 0, message, works=works or ("", "", ""))
        for name, start, setup, message, works in GIT_WORKS
    ]
    return rows


# --- trees ---------------------------------------------------------------------------------


def _symlink(rel: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        outside = ctx.tmp / "elsewhere" / Path(rel).name
        outside.parent.mkdir()
        shutil.move(str(ctx.tree / rel), outside)
        (ctx.tree / rel).symlink_to(outside)
        return ["apply", str(ctx.tree)]

    return setup


def _tree_op(action: Callable[[Ctx], None], *args: str) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        action(ctx)
        return ["apply", *args, str(ctx.tree)]

    return setup


def _lock_is_folder(ctx: Ctx) -> None:
    (state_dir(ctx.tree) / "lock").mkdir(parents=True)


def _state_folder_is_file(ctx: Ctx) -> None:
    folder = state_dir(ctx.tree)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder\n")


TREE_ROWS: List[Tuple[str, str, Callable[[Ctx], List[str]], int, str]] = [
    ("symlinked-file", "pristine", _symlink(TC), 9, "symbolic link on the path"),
    ("symlinked-folder", "pristine", _symlink("megatron/core/models"), 9, "symbolic link"),
    ("missing-touched-file", "pristine", _tree_op(lambda c: (c.tree / LM).unlink()), 7,
     "uncommitted changes"),
    ("missing-touched-file-plain", "plain", _tree_op(lambda c: (c.tree / TL).unlink()), 6,
     "missing"),
    ("adapter-path-is-a-folder", "pristine",
     _tree_op(lambda c: (c.tree / ADAPTER).mkdir()), 10, "move it out of the way"),
    ("package-info-missing", "pristine", _tree_op(lambda c: (c.tree / INFO).unlink()), 4,
     "package_info.py"),
    ("package-info-garbage", "pristine",
     _tree_op(lambda c: (c.tree / INFO).write_text("MAJOR = (\n")), 4, "cannot read"),
    ("lock-is-a-folder", "pristine", _tree_op(_lock_is_folder), 19, "is not a plain file"),
    ("lock-is-a-folder-plain", "plain", _tree_op(_lock_is_folder), 19, "is not a plain file"),
    ("state-folder-is-a-file", "pristine", _tree_op(_state_folder_is_file), 19,
     "is not a folder"),
    ("edited-after-apply", "applied", _tree_op(lambda c: (c.tree / MLA).write_text("x\n"),
                                               "--revert"), 14, "edited after apply"),
    ("adapter-edited-after-apply", "applied",
     _tree_op(lambda c: (c.tree / ADAPTER).write_text("x\n"), "--revert"), 14,
     "edited after apply"),
    ("half-applied-uncommitted", "applied",
     _tree_op(lambda c: git(c.tree, "checkout", "--", TC)), 14, "half applied"),
]  # fmt: skip

TREE_WORKS: List[Tuple[str, str, Callable[[Ctx], List[str]], str]] = [
    (
        "txn-without-journal",
        "pristine",
        _tree_op(lambda c: (state_dir(c.tree) / "txn" / "backup").mkdir(parents=True)),
        "applied core_v0.19",
    ),
    (
        "leftover-scratch",
        "pristine",
        _tree_op(lambda c: (state_dir(c.tree) / "scratch-0123").mkdir(parents=True)),
        "applied core_v0.19",
    ),
    (
        "leftover-temp-state",
        "applied",
        _tree_op(lambda c: (state_dir(c.tree) / ".state.json.tmp").write_text("{"), "--revert"),
        "reverted",
    ),
]


def tree_rows() -> List[Row]:
    rows = [Row(f"tree-{name}", "tree", start, setup, code, message)
            for name, start, setup, code, message in TREE_ROWS]  # fmt: skip
    rows += [Row(f"tree-{name}", "tree", start, setup, 0, message, works=STARTS[start])
             for name, start, setup, message in TREE_WORKS]  # fmt: skip
    return rows


def rows() -> List[Row]:
    """Every row of the sweep."""
    return (
        state_rows() + journal_rows() + store_rows() + bundle_rows() + arg_rows() + git_rows()
        + tree_rows()
    )  # fmt: skip


# --- running a row -------------------------------------------------------------------------


def run_row(row: Row, templates: integrity.Templates, tmp: Path) -> str:
    """Run one row; ``""`` when its code, message, and what it left all hold."""
    start = templates.get(*STARTS[row.start])[0]
    ctx = Ctx(integrity.copy(start, tmp / "tree"), tmp, dict(integrity.REAL_ENV))
    args = row.setup(ctx)
    before = integrity.snapshot(ctx.tree) if ctx.tree.exists() else None
    left_before = integrity.leftovers(ctx.tree)
    done = integrity.run(args, ctx.env, ctx.cwd, remove_cwd=ctx.remove_cwd)
    if done.traceback:
        return f"traceback:\n{done.text}"
    if done.code != row.code:
        return f"exit {done.code} (signal {done.signal}), wanted {row.code}:\n{done.text}"
    if row.message not in done.text:
        return f"{row.message!r} not in the output:\n{done.text}"
    if row.code != 0 and "->" not in done.err and '"hint"' not in done.out:
        return f"no hint says what to do:\n{done.text}"
    if row.works is None:
        if before is not None and integrity.snapshot(ctx.tree) != before:
            return "the run changed the tree, HEAD, the history or the index"
        if integrity.leftovers(ctx.tree) != left_before:
            return f"leftovers changed: {integrity.leftovers(ctx.tree)}"
        return ""
    if row.works != ("", "", "") and row.works is not None:
        wanted = templates.get(*row.works)[2]
        if integrity.snapshot(ctx.tree) != wanted:
            return f"claimed success, but the tree is not as a finished run leaves it:\n{done.text}"
    return _verify_claim(ctx, done)


def _verify_claim(ctx: Ctx, done: integrity.Result) -> str:
    """A success is checked against the tree: --status must agree with what the run said."""
    status = integrity.run(["apply", "--status", str(ctx.tree)], ctx.env)
    said_applied = "mla-seam: applied" in done.out or "already applied" in done.out
    state = (status.out.splitlines() or [""])[0]
    if said_applied and not (status.code == 0 and state.startswith("applied")):
        return f"said applied, --status says {state!r} (exit {status.code})"
    if "mla-seam: reverted" in done.out and status.code != 21:
        return f"said reverted, --status says {state!r} (exit {status.code})"
    if integrity.leftovers(ctx.tree):
        return f"leftovers: {integrity.leftovers(ctx.tree)}"
    return ""
