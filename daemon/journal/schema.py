"""The journal's rows: the typed rows, and how values are stored (the tables: migrations.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from daemon.fsutil import Identity
from daemon.model import FileState, RowChanges, ScanChanges, replaced

__all__ = ["AuditRow", "FileRow", "FleetMember", "RowOrder"]

_JSON_COLUMNS = ("threats", "raw_result", "cached_from")
_PATH_COLUMNS = ("rel_path", "destination", "dest_rel")
_ACTIVE = "state NOT IN ('done', 'gone')"  # the condition of `files_active`, so it serves
_FINISHED = "(state = 'done' OR state = 'gone')"  # the condition of `files_finished`
# A claimed row, in any state, is its owner's until it commits it with `owner = NULL`
# (or `reclaim` finds the owner dead): never two workers on one file.
# Queries of the work queue write `+watch`: the unary plus keeps SQLite from picking the
# watch index (every row of the watch, done ones too) over the due-ordered partial ones.
# Written as comparisons, not an IN list: the partial index `files_claimable` (migrations.py) has
# this very condition, which SQLite must find in a query's to use it.
_CLAIMABLE = ("((state = 'discovered' OR state = 'stable' OR state = 'verdict' OR state = 'scanning'"
              " OR state = 'moving') AND owner IS NULL)")


_WRITABLE = frozenset(RowChanges.__annotations__)
_SCAN_WRITABLE = frozenset(ScanChanges.__annotations__)


@dataclass(frozen=True)
class FileRow:
    """One arrival as the journal has it."""

    id: int
    watch: str
    rel_path: str
    state: FileState
    dev: int | None
    inode: int | None
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    sha256: str | None
    ref_id: str | None
    engine: str | None
    engine_scan_id: str | None
    attempts: int
    move_attempts: int
    next_attempt_at: float
    verdict: str | None
    reason: str | None
    threats: list[str] | None
    raw_result: dict[str, Any] | None
    destination: str | None
    disposition: str | None
    owner: str | None
    last_error: str | None
    discovered_at: float
    stable_at: float | None
    scanned_at: float | None
    done_at: float | None
    updated_at: float
    etag: str | None = None  # S3 sources: the listed (then scanned) object version
    version_id: str | None = None
    submitting_at: float | None = None  # a remote submission may have happened: in doubt until answered
    dest_root: str | None = None  # the planned destination: its root (as configured)...
    dest_rel: str | None = None  # ...and the name below it
    last_modified: float | None = None  # S3 sources: the version's LastModified (epoch seconds)
    snapshot: str | None = None  # S3 sources: the key of the private snapshot scanned, if one was made

    def updated(self, changes: RowChanges) -> FileRow:
        """This row with `changes` applied (as the journal will have it once they commit)."""
        return replaced(self, changes)

    @property
    def identity(self) -> Identity | None:
        """A local file's identity when it settled or was scanned; None before (and for S3)."""
        if self.size is None or self.inode is None:
            return None
        return Identity(self.dev or 0, self.inode or 0, self.size, self.mtime_ns or 0,
                        self.ctime_ns or 0)


@dataclass(frozen=True)
class FleetMember:
    """This daemon in one fleet watch: its lease holder name, the lease's expiry while it holds
    the listing lease (else None), and the SQS messages it holds (objects in flight)."""

    holder: str
    lease_until: float | None
    messages_held: int
    updated_at: float

    def holds_lease(self, now: float) -> bool:
        return self.lease_until is not None and now < self.lease_until


@dataclass(frozen=True)
class AuditRow:
    """One audited quarantine action."""

    file_id: int
    at: float
    action: str
    actor: str
    reason: str
    detail: str | None


def _to_db(column: str, value: object) -> object:
    if value is None:
        return None
    if column in _PATH_COLUMNS:
        return os.fsencode(str(value))
    if column in _JSON_COLUMNS:
        return json.dumps(value, sort_keys=True)
    if column == "state":
        return str(value)
    if isinstance(value, str):  # most are ASCII, which `_text` gives back unchanged
        return value if type(value) is str and value.isascii() else _text(value)
    return value


# An SQL statement and the parameters of each of its executions.
_Statement = tuple[str, list[tuple[Any, ...]]]


def _text(value: str) -> str:
    """A message for a TEXT column: a name's non-UTF-8 byte becomes `\\udcff` (SQLite takes UTF-8 only)."""
    return value.encode("utf-8", "backslashreplace").decode()


def _insert_file(conn: sqlite3.Connection, row: Mapping[str, object]) -> int:
    """Insert a whole row (column → value); its id."""
    cursor = conn.execute(f"INSERT INTO files ({', '.join(row)}) VALUES ({','.join('?' * len(row))})",
                          [_to_db(name, value) for name, value in row.items()])
    return int(cursor.lastrowid or 0)


def _update_file(conn: sqlite3.Connection, file_id: int, fields: RowChanges) -> None:
    _run(conn, _file_updates([(file_id, fields)]))


def _file_updates(changes: Iterable[tuple[int, RowChanges]]) -> list[_Statement]:
    """Each row's changes, in order, as statements made before the transaction (the values
    converted outside the writers' lock): a run of rows changing the same columns (a batch's
    verdicts, its placements) is one statement executed for all of them."""
    now = time.time()
    statements = []
    for names, run in itertools.groupby(changes, key=lambda change: tuple(change[1])):
        if unknown := set(names) - _WRITABLE:
            raise ValueError(f"not journal columns: {sorted(unknown)}")
        columns = ", ".join(f"{name} = ?" for name in names)
        statements.append((f"UPDATE files SET {columns}, updated_at = ? WHERE id = ?",
                           [(*(_to_db(name, value) for name, value in fields.items()), now, file_id)
                            for file_id, fields in run]))
    return statements


def _run(conn: sqlite3.Connection, statements: Iterable[_Statement]) -> None:
    for sql, params in statements:
        conn.executemany(sql, params)


def _from_db(row: sqlite3.Row) -> FileRow:
    keys = row.keys()
    decoders = _DECODERS.get(tuple(keys)) or _decoders(tuple(keys))
    values = list(row)
    for index, decode in decoders:
        if values[index] is not None:
            values[index] = decode(values[index])
    if len(values) == len(_FIELDS) and decoders is _DECODERS.get(_FIELDS):
        # Every column a field, in order: fill the frozen row directly, skipping
        # the dataclass __init__ (its 34 `object.__setattr__` were most of this cost).
        decoded = object.__new__(FileRow)
        decoded.__dict__.update(zip(_FIELDS, values, strict=True))
        return decoded
    return FileRow(**dict(zip(keys, values, strict=True)))


_FIELDS = tuple(field.name for field in dataclasses.fields(FileRow))
_COLUMN_DECODERS: dict[str, Any] = {**dict.fromkeys(_PATH_COLUMNS, os.fsdecode),
                                    **dict.fromkeys(_JSON_COLUMNS, json.loads), "state": FileState}
_DECODERS: dict[tuple[str, ...], list[tuple[int, Any]]] = {}


def _decoders(keys: tuple[str, ...]) -> list[tuple[int, Any]]:
    """Which positions of a row with these columns need decoding, and how (cached)."""
    decoders = [(i, _COLUMN_DECODERS[k]) for i, k in enumerate(keys) if k in _COLUMN_DECODERS]
    _DECODERS[keys] = decoders
    return decoders


_NEW_ROW = {**dict.fromkeys(_FIELDS), "attempts": 0, "move_attempts": 0}  # the columns' defaults


def _new_row(file_id: int, columns: Mapping[str, Any]) -> FileRow:
    """The row just inserted with `columns` (decoded values) as `id`: as the journal has it."""
    row = object.__new__(FileRow)  # as `_from_db` fills it
    row.__dict__.update(_NEW_ROW, **columns, id=file_id)
    return row


def _audit(conn: sqlite3.Connection, file_id: int, action: str, actor: str, reason: str,
           detail: str | None, changes: Mapping[str, object], now: float) -> None:
    conn.execute("INSERT INTO audit (file_id, at, action, actor, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                 (file_id, now, action, _text(actor), _text(reason), _to_db("detail", detail)))
    if changes:
        columns = ", ".join(f"{name} = ?" for name in changes)
        values = [_to_db(name, value) for name, value in changes.items()]
        conn.execute(f"UPDATE files SET {columns}, updated_at = ? WHERE id = ?", (*values, now, file_id))


def _rescan_record(conn: sqlite3.Connection, rescan_id: int, rel_path: str, outcome: str,
                   file_id: int | None, plan: Mapping[str, Any] | None) -> None:
    conn.execute("INSERT OR REPLACE INTO rescan_files VALUES (?, ?, ?, ?, ?)",
                 (rescan_id, os.fsencode(rel_path), outcome, file_id,
                  json.dumps(plan) if plan is not None else None))


# Reading: `Journal.rows` orders by one of these columns and matches threat names one by one.
RowOrder = Literal["id", "done_at", "updated_at"]
_ORDER_COLUMNS: Mapping[str, str] = {"id": "id", "done_at": "done_at", "updated_at": "updated_at"}
_THREAT_LIKE = "EXISTS (SELECT 1 FROM json_each(threats) WHERE value LIKE ? ESCAPE '\\')"


def _like_substring(text: str) -> str:
    """A LIKE pattern (with `ESCAPE '\\'`) matching `text` literally anywhere."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
