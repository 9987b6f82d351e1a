"""The files mla-seam reads back from a tree's state folder, each through one validated schema.

* the state record, ``state.json`` (:class:`State`): what is applied, how, and what every touched
  file was before and after; written with a sha256 checksum of its own canonical bytes;
* the commit journal, ``txn/journal.json`` (:class:`Journal`): the transaction in progress.

:func:`parse` checks a decoded JSON value against a schema dataclass, field by field (types from
the annotations, value checks from ``field(metadata={"check": ...})``), and raises
:class:`RecordError` naming the first malformed field (``applied.offsets: 'many' is not a whole
number``). Callers turn that into an exit code (:class:`~mla_seam.errors.StateCorruptError`) with
the way back; nothing downstream ever sees a record that did not pass.

Schema 1 records (mla-seam 0.1.0 and the 0.2.0 development builds) carry no checksum and fewer
fields; they are read with the same schema (the fields they lack take their defaults).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

STATE_SCHEMA = 2
STATE_SCHEMAS = (1, 2)  # 1: no checksum (mla-seam 0.1.0, 0.2.0 development builds)
JOURNAL_SCHEMAS = (1, 2)

_HEX_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TXN = re.compile(r"^[0-9a-f]{1,64}$")
T = TypeVar("T")


class RecordError(ValueError):
    """A value that does not fit its schema: ``where`` (a dotted path) and what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


# --- value checks --------------------------------------------------------------------------


def _pattern(regex: "re.Pattern[str]", what: str) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if value is not None and not regex.match(value):
            raise RecordError(where, f"{value!r} is not {what}")

    return check


def _relpath(value: Any, where: str) -> None:
    parts = value.split("/")
    if (
        not value
        or value.startswith("/")
        or "\\" in value
        or "\0" in value
        or any(p in ("", ".", "..") or p.lower() == ".git" for p in parts)
    ):
        raise RecordError(where, f"{value!r} is not a safe path inside the tree")


def _one_of(*choices: object) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if value not in choices:
            raise RecordError(where, f"{value!r} is not one of {', '.join(map(str, choices))}")

    return check


def _at_least(low: int) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if value < low:
            raise RecordError(where, f"{value!r} is below {low}")

    return check


def _between(low: int, high: int) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if not low <= value <= high:
            raise RecordError(where, f"{value!r} is not between {low} and {high}")

    return check


def _each(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def run(value: Any, where: str) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            check(item, f"{where}[{key!r}]" if isinstance(value, dict) else f"{where}[{key}]")

    return run


def _keys(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def run(value: Any, where: str) -> None:
        for key in value:
            check(key, f"{where} key {key!r}")

    return run


def _all(*checks: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def run(value: Any, where: str) -> None:
        for check in checks:
            check(value, where)

    return run


BLOB = {"check": _pattern(_HEX_ID, "a git object id")}
COMMIT = BLOB
RELPATH = {"check": _relpath}
NONNEG = {"check": _at_least(0)}


def _field(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- the parser ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "a whole number", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is dict:
        return "an object"
    if origin in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return str(tp)


def _parse_value(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None:
            return None
        return _parse_value(options[0], value, where)
    if tp is str:
        if not isinstance(value, str):
            raise RecordError(where, f"{value!r} is not a string")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(where, f"{value!r} is not a whole number")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecordError(where, f"{value!r} is not true or false")
        return value
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise RecordError(where, f"{_short(value)} is not an object")
        return {k: _parse_value(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise RecordError(where, f"{_short(value)} is not a list")
        return [_parse_value(item, v, f"{where}[{k}]") for k, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    raise TypeError(f"no parser for {tp!r}")  # a schema bug, not a damaged record


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(cls: Type[T], value: Any, where: str = "") -> T:
    """``value`` (decoded JSON) checked against the dataclass ``cls``; raises RecordError."""
    if not isinstance(value, dict):
        raise RecordError(where, f"{_short(value)} is not an object")
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = f"{where}.{spec.name}" if where else spec.name
        if spec.name not in value:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise RecordError(path, "missing")
            continue
        parsed = _parse_value(hints[spec.name], value[spec.name], path)
        check = spec.metadata.get("check")
        if check is not None and parsed is not None:
            check(parsed, path)
        kwargs[spec.name] = parsed
    result = cls(**kwargs)
    validate = getattr(result, "validate", None)
    if validate is not None:
        validate(where)
    return result


def to_json(obj: Any) -> Any:
    """A schema object as plain JSON values (the inverse of :func:`parse`)."""
    return dataclasses.asdict(obj)


# --- the state record ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileImages:
    """A touched file before (``pre``) and after (``post``) apply, in committed form."""

    pre: str = _field(**BLOB)
    post: str = _field(**BLOB)


@dataclasses.dataclass(frozen=True)
class InFork:
    """A hunk the fork already held verbatim: skipped on apply, left alone on revert."""

    patch: str
    file: str = _field(**RELPATH)
    hunk: int = _field(**{"check": _at_least(1)})
    commit: str = ""  # "abc1234 (subject)" of the fork commit that added it, if known


@dataclasses.dataclass(frozen=True)
class Applied:
    """What one run applied: the series, how, and every file's pre- and post-image."""

    line: str = _field(**{"check": _pattern(_LINE, "a release line folder name")})
    release: str
    series_sha256: str = _field(**{"check": _pattern(_SHA256, "a sha256")})
    files: Dict[str, FileImages] = _field(**{"check": _keys(_relpath)})
    overlay: Dict[str, str] = _field(**{"check": _all(_keys(_relpath), _each(BLOB["check"]))})
    method: str = _field("exact", check=_one_of("exact", "fork", "3way"))
    mode: str = _field("worktree", check=_one_of("worktree", "commit"))
    offsets: int = _field(0, **NONNEG)
    overlay_before: Optional[Dict[str, Optional[str]]] = _field(
        None, check=_all(_keys(_relpath), _each(BLOB["check"]))
    )
    commits: List[str] = _field([], check=_each(COMMIT["check"]))
    head_before: Optional[str] = _field(None, **COMMIT)
    head_after: Optional[str] = _field(None, **COMMIT)
    in_fork: List[InFork] = _field([])
    merged: List[str] = _field([])  # patches merged 3-way (their hunks need review)

    def validate(self, where: str) -> None:
        """Cross-field rules: at least one file; commit mode names its commits and heads."""
        here = f"{where}." if where else ""
        if not self.files:
            raise RecordError(f"{here}files", "empty (a record applies at least one file)")
        if self.mode == "commit" and not (self.commits and self.head_before and self.head_after):
            raise RecordError(
                f"{here}commits", "commit mode without its commits, head_before and head_after"
            )
        if self.commits and self.head_after and self.commits[-1] != self.head_after:
            raise RecordError(f"{here}head_after", "is not the last of the series' commits")

    def pre_post(self) -> Dict[str, Tuple[str, str]]:
        """``rel -> (pre blob, post blob)``."""
        return {rel: (img.pre, img.post) for rel, img in self.files.items()}


@dataclasses.dataclass(frozen=True)
class State:
    """``state.json``: what is applied (``applied``: nothing when ``None``)."""

    schema: int = _field(**{"check": _one_of(*STATE_SCHEMAS)})
    applied: Optional[Applied] = None
    txn: str = _field("", check=_pattern(re.compile(r"^[0-9a-f]{0,64}$"), "a transaction id"))
    tool: str = "mla-seam (unknown version)"
    checksum: Optional[str] = _field(None, check=_pattern(_SHA256, "a sha256"))


def checksum(value: Dict[str, Any], encode: Callable[[object], bytes]) -> str:
    """The sha256 of a record's canonical bytes without its ``checksum`` field."""
    return hashlib.sha256(encode({k: v for k, v in value.items() if k != "checksum"})).hexdigest()


def parse_state(value: Any, encode: Callable[[object], bytes]) -> State:
    """The state record, checked field by field and against its checksum (schema 2)."""
    if not isinstance(value, dict):
        raise RecordError("", f"{_short(value)} is not an object")
    if value.get("schema") not in STATE_SCHEMAS:
        raise RecordError("schema", f"{value.get('schema')!r} is not one this mla-seam reads")
    state = parse(State, value)
    if state.schema >= 2:
        if state.checksum is None:
            raise RecordError("checksum", "missing")
        if checksum(value, encode) != state.checksum:
            raise RecordError(
                "checksum", "does not match the record's bytes (edited by hand, or a disk error)"
            )
    return state


# --- the journal ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """One tree file of a transaction: its old and new blob, where its temp copy goes."""

    path: str = _field(**RELPATH)
    existed: bool
    old: Optional[str] = _field(**BLOB)
    new: Optional[str] = _field(**BLOB)
    tmp: str = _field(**RELPATH)
    mode: int = _field(0o644, check=_between(0, 0o7777))
    uid: Optional[int] = None
    gid: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class HeadMove:
    """Commit mode: HEAD goes from ``old`` to ``new`` after the commit point, and the index
    entries of ``paths`` follow it."""

    old: str = _field(**COMMIT)
    new: str = _field(**COMMIT)
    paths: List[str] = _field(check=_each(_relpath))
    reason: str = "mla-seam"


@dataclasses.dataclass(frozen=True)
class Journal:
    """``txn/journal.json``: a transaction in progress (its files, and a HEAD move)."""

    schema: int = _field(**{"check": _one_of(*JOURNAL_SCHEMAS)})
    txn: str = _field(**{"check": _pattern(_TXN, "a transaction id")})
    files: List[JournalEntry] = _field()
    op: str = "run"
    pid: int = 0
    head: Optional[HeadMove] = None
