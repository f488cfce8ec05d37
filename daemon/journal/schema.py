"""The journal's tables and rows: the migrations, the typed rows, and how values are stored."""

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

__all__ = ["SCHEMA", "VERDICT_TABLES", "AuditRow", "FileRow", "FleetMember", "RowOrder"]

# The verdict cache's entries, each engine's verdicts by signatures and sha256, kept newest
# first (rowid order: a replaced entry is new again; the order index serves eviction), and
# its counts: the journal's once, the kept verdicts' own file's now (daemon/journal/cache.py).
VERDICT_TABLES = """
    CREATE TABLE verdict_cache (
        engine TEXT NOT NULL, fingerprint TEXT NOT NULL, sha256 TEXT NOT NULL,
        verdict TEXT NOT NULL, reason TEXT, threats TEXT,
        ref_id TEXT, engine_scan_id TEXT, scanned_at REAL NOT NULL,
        PRIMARY KEY (engine, fingerprint, sha256)
    );
    CREATE INDEX verdict_cache_order ON verdict_cache(engine);
    CREATE TABLE cache_stats (
        engine TEXT PRIMARY KEY, hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
        stored INTEGER NOT NULL DEFAULT 0
    );
"""

SCHEMA = [
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        watch TEXT NOT NULL,
        rel_path BLOB NOT NULL,          -- os.fsencode: file names need not be UTF-8
        state TEXT NOT NULL,
        dev INTEGER, inode INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
        sha256 TEXT, ref_id TEXT, engine TEXT, engine_scan_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        move_attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        verdict TEXT, reason TEXT, threats TEXT, raw_result TEXT,
        destination BLOB, disposition TEXT,
        owner TEXT, last_error TEXT,
        discovered_at REAL NOT NULL, stable_at REAL, scanned_at REAL, done_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX files_active ON files(watch, rel_path)
        WHERE state NOT IN ('done', 'gone');
    CREATE INDEX files_due ON files(state, next_attempt_at) WHERE state NOT IN ('done', 'gone');
    CREATE INDEX files_outcome ON files(verdict, done_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL REFERENCES files(id),
        at REAL NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
        reason TEXT NOT NULL, detail TEXT
    );
    CREATE TABLE engines (
        name TEXT PRIMARY KEY, healthy INTEGER NOT NULL, detail TEXT, checked_at REAL NOT NULL
    );
    """,
    # S3 sources: the object version a row stands for; rows of any state remember it.
    """
    ALTER TABLE files ADD COLUMN etag TEXT;
    ALTER TABLE files ADD COLUMN version_id TEXT;
    CREATE INDEX files_seen ON files(watch, rel_path, etag);
    """,
    # Remote engines: a submission sent (or about to be) whose answer is not journaled yet.
    """
    ALTER TABLE files ADD COLUMN submitting_at REAL;
    """,
    # The move plan as the mover executes it: the destination root and the name below it.
    """
    ALTER TABLE files ADD COLUMN dest_root TEXT;
    ALTER TABLE files ADD COLUMN dest_rel BLOB;
    """,
    # Several engines on one watch: one scan record per (file, engine) (daemon/pipeline/multi.py).
    """
    CREATE TABLE scans (
        file_id INTEGER NOT NULL REFERENCES files(id),
        engine TEXT NOT NULL,
        sha256 TEXT NOT NULL, ref_id TEXT, engine_scan_id TEXT,
        verdict TEXT, reason TEXT, threats TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, submitting_at REAL,
        next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, scanned_at REAL,
        abandoned INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (file_id, engine)
    );
    CREATE INDEX scans_engine_scan ON scans(engine, engine_scan_id);
    """,
    # `scan --rescan-clean`: each rescan of a watch's clean files, and what it did to each one
    # (daemon/rescan.py); `plan` holds a quarantine move journaled before it is made.
    """
    CREATE TABLE rescans (
        id INTEGER PRIMARY KEY, watch TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL
    );
    CREATE TABLE rescan_files (
        rescan_id INTEGER NOT NULL REFERENCES rescans(id),
        rel_path BLOB NOT NULL, outcome TEXT NOT NULL,
        file_id INTEGER REFERENCES files(id), plan TEXT,
        PRIMARY KEY (rescan_id, rel_path)
    );
    """,
    # Fleet watches (docs/fleet.md): this daemon's part, for `status` and the metrics.
    """
    CREATE TABLE fleet (
        watch TEXT PRIMARY KEY, holder TEXT NOT NULL, lease_until REAL,
        messages_held INTEGER NOT NULL, updated_at REAL NOT NULL
    );
    """,
    # The work queue in due order: `claim` and `next_due_at` read a batch off its head
    # instead of every row of the watch, so their cost does not grow with the backlog.
    """
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE state IN ('stable', 'verdict', 'scanning', 'moving') AND owner IS NULL;
    -- `counts` (status, metrics) reads this index alone, already in group order.
    CREATE INDEX files_counts ON files(watch, state, verdict, reason);
    """,
    # S3 sources: the object version's LastModified (epoch seconds), so that the same bytes
    # uploaded again under a judged key are a new arrival (docs/contract.md, "S3 in place").
    """
    ALTER TABLE files ADD COLUMN last_modified REAL;
    """,
    # S3 sources: the private server-side snapshot a row is scanned and promoted from
    # (daemon/locations/s3staging.py), deleted with the source once the row is moved.
    """
    ALTER TABLE files ADD COLUMN snapshot TEXT;
    """,
    # The verdict cache by content (docs/engines.md, "Verdict cache", daemon/journal/cache.py):
    # each engine's verdicts by signatures and sha256, kept newest first (rowid order); the
    # scans in flight that identical bytes wait for; hits and misses for `status`. The
    # verdicts and their counts have since had a file of their own (`VerdictStore`), made with
    # the same tables: these are only read once, to be copied there.
    VERDICT_TABLES + """
    CREATE TABLE cache_flights (
        engine TEXT NOT NULL, sha256 TEXT NOT NULL, file_id INTEGER NOT NULL REFERENCES files(id),
        started_at REAL NOT NULL,
        PRIMARY KEY (engine, sha256)
    );
    ALTER TABLE scans ADD COLUMN cached_from TEXT;
    CREATE INDEX scans_waiting ON scans(sha256) WHERE verdict IS NULL;
    """,
    # The claimable rows' condition as comparisons: SQLite evaluates an IN list of more than
    # two values through a temporary b-tree, made and freed at each evaluation, and a partial
    # index's condition is evaluated for the old and the new row of every row written: two
    # such b-trees per INSERT and UPDATE of `files`, under the writers' lock (bench/RESULTS.md,
    # "Issue 21"). `_CLAIMABLE` is the same expression, so the work queue's queries use it.
    """
    DROP INDEX files_claimable;
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE (state = 'stable' OR state = 'verdict' OR state = 'scanning' OR state = 'moving')
              AND owner IS NULL;
    """,
    # Outcomes by verdict were indexed for every row, each one changed twice (its verdict,
    # then its done time): 3 of the 25 pages a batch of 16 clean files wrote to the WAL. Only
    # the quarantine is listed by verdict (`Journal.rows`, `scanwatch quarantine list`).
    """
    DROP INDEX files_outcome;
    CREATE INDEX files_quarantined ON files(done_at) WHERE verdict = 'infected';
    """,
    # Discovered rows are claimed too: the worker that takes one settles it (one lstat) and
    # scans it in the same batch, where the daemon's watcher used to settle every file with
    # a row write of its own (daemon/pipeline/settling.py).
    """
    DROP INDEX files_claimable;
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE (state = 'discovered' OR state = 'stable' OR state = 'verdict' OR state = 'scanning'
               OR state = 'moving') AND owner IS NULL;
    """,
    # A row's state changes three times on its way (claimed, judged, done), and SQLite
    # rewrites a row's entry in every index that names a column written: `files_due` and
    # `files_counts` had `state` in their key, 6.6 of the ~42 µs per file that the journal's
    # lock serialises (bench/RESULTS.md, "Issue 21"). The queue is read by `files_claimable`,
    # the active rows by `files_active`; the finished rows are counted from an index of their
    # own, written once, when a row finishes; the rows waiting for a flight of the verdict
    # cache, which `files_due` found among the rows due later, are listed where they wait (a
    # row waiting across the upgrade asks for itself when its wait ends).
    """
    DROP INDEX files_due;
    DROP INDEX files_counts;
    CREATE INDEX files_finished ON files(watch, state, verdict, reason)
        WHERE state = 'done' OR state = 'gone';
    CREATE TABLE cache_waiters (
        engine TEXT NOT NULL, sha256 TEXT NOT NULL, file_id INTEGER NOT NULL REFERENCES files(id),
        PRIMARY KEY (engine, sha256, file_id)
    ) WITHOUT ROWID;
    """,
]

_JSON_COLUMNS = ("threats", "raw_result", "cached_from")
_PATH_COLUMNS = ("rel_path", "destination", "dest_rel")
_ACTIVE = "state NOT IN ('done', 'gone')"  # the condition of `files_active`, so it serves
_FINISHED = "(state = 'done' OR state = 'gone')"  # the condition of `files_finished`
# A claimed row, in any state, is its owner's until it commits it with `owner = NULL`
# (or `reclaim` finds the owner dead): never two workers on one file.
# Queries of the work queue write `+watch`: the unary plus keeps SQLite from picking the
# watch index (every row of the watch, done ones too) over the due-ordered partial ones.
# Written as comparisons, not an IN list: the partial index `files_claimable` (SCHEMA) has
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
