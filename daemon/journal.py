"""The journal: one SQLite file in WAL mode, the only shared state and the work queue.

One row per arrival. Rows move forward (see `FileState`) in transactions; the
intent of every side effect is written before it and the outcome after, so any
step can be replayed after a crash. Each thread uses its own connection; other
processes (`scan --move`, `status`, `quarantine`) open the same file beside the
daemon. A claimed row carries its owner's token (`pid:start time`); rows of a
dead owner are handed back by `reclaim`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from daemon.errors import JournalError
from daemon.fsutil import Identity
from daemon.model import ACTIVE_STATES, FileState, RowChanges, VerdictKind

__all__ = ["AuditRow", "FileRow", "Journal", "RowChanges", "RowOrder", "open_journal", "owner_token"]

_SCHEMA = [
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
    # The work queue in due order: `claim` and `next_due_at` read a batch off its head
    # instead of every row of the watch, so their cost does not grow with the backlog.
    """
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE state IN ('stable', 'verdict', 'scanning', 'moving') AND owner IS NULL;
    -- `counts` (status, metrics) reads this index alone, already in group order.
    CREATE INDEX files_counts ON files(watch, state, verdict, reason);
    """,
]

_JSON_COLUMNS = ("threats", "raw_result")
_PATH_COLUMNS = ("rel_path", "destination", "dest_rel")
_ACTIVE = "state NOT IN ('done', 'gone')"
# A claimed row, in any state, is its owner's until it commits it with `owner = NULL`
# (or `reclaim` finds the owner dead): never two workers on one file.
# Queries of the work queue write `+watch`: the unary plus keeps SQLite from picking the
# watch index (every row of the watch, done ones too) over the due-ordered partial ones.
_CLAIMABLE = "(state IN ('stable', 'verdict', 'scanning', 'moving') AND owner IS NULL)"


_WRITABLE = frozenset(RowChanges.__annotations__)


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

    def updated(self, changes: RowChanges) -> FileRow:
        """This row with `changes` applied (as the journal will have it once they commit)."""
        return dataclasses.replace(self, **changes)

    @property
    def identity(self) -> Identity | None:
        """A local file's identity when it settled or was scanned; None before (and for S3)."""
        if self.size is None or self.inode is None:
            return None
        return Identity(self.dev or 0, self.inode or 0, self.size, self.mtime_ns or 0,
                        self.ctime_ns or 0)


@dataclass(frozen=True)
class AuditRow:
    """One audited quarantine action."""

    file_id: int
    at: float
    action: str
    actor: str
    reason: str
    detail: str | None


def owner_token(pid: int | None = None) -> str:
    """`pid:start time` of a process, unique across pid reuse."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "dead"
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    return stat.rpartition(")")[2].split()[19]


def _is_alive(token: str) -> bool:
    pid, _, start = token.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def open_journal(state_dir: Path) -> Journal:
    """The journal kept under `state_dir`."""
    return Journal(state_dir / "journal.sqlite3")


def _to_db(column: str, value: object) -> object:
    if value is None:
        return None
    if column in _PATH_COLUMNS:
        return os.fsencode(str(value))
    if column in _JSON_COLUMNS:
        return json.dumps(value, sort_keys=True)
    if column == "state":
        return str(value)
    if isinstance(value, str):
        return _text(value)
    return value


def _text(value: str) -> str:
    """A message for a TEXT column: a name's non-UTF-8 byte becomes `\\udcff` (SQLite takes UTF-8 only)."""
    return value.encode("utf-8", "backslashreplace").decode()


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


class Journal:
    """The SQLite journal under `state_dir`; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}; "
                               "check that state_dir exists and is writable") from exc

    # -- plumbing -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                # Short-lived threads (one per metrics scrape) must not leave connections behind.
                for thread in [t for t in self._connections if not t.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # Our own threads queue on a lock: SQLite's busy handler would sleep for
        # milliseconds each time; it is left to settle contention with other processes.
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path} is not writable: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise JournalError(f"journal {self.path}: commit failed: {exc}") from exc

    def _migrate(self) -> None:
        # Read first: a write transaction here would queue every `status` behind a drain.
        if self._conn().execute("PRAGMA user_version").fetchone()[0] == len(_SCHEMA):
            return
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- intake -----------------------------------------------------------------------------

    def discover(self, watch: str, entries: Iterable[tuple[str, int]], now: float,
                 settled: Mapping[str, Identity] | None = None) -> int:
        """Record `(rel_path, inode)` arrivals; known active paths are left as they are.

        A path held back (a symlink, say) whose inode changed is a new arrival again.
        A path in `settled` (a watch with `settle_seconds: 0`, its file just lstat'ed)
        is recorded stable at once with that identity: the settle step has nothing to add.
        Returns how many rows were added or revived. Idempotent.
        """
        added = 0
        with self._tx() as conn:
            for rel_path, inode in entries:
                identity = settled.get(rel_path) if settled else None
                state, stable_at = ("stable", now) if identity else ("discovered", None)
                dev, size, mtime_ns, ctime_ns = ((identity.dev, identity.size, identity.mtime_ns,
                                                  identity.ctime_ns) if identity else (None,) * 4)
                cursor = conn.execute(
                    f"""INSERT INTO files (watch, rel_path, state, inode, dev, size, mtime_ns,
                                          ctime_ns, stable_at, next_attempt_at, discovered_at,
                                          updated_at)
                        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO UPDATE
                        SET state = excluded.state, inode = excluded.inode, reason = NULL,
                            dev = excluded.dev, size = excluded.size, mtime_ns = excluded.mtime_ns,
                            ctime_ns = excluded.ctime_ns, stable_at = excluded.stable_at,
                            next_attempt_at = excluded.next_attempt_at,
                            discovered_at = excluded.discovered_at, updated_at = excluded.updated_at
                        WHERE files.state = 'held' AND files.inode IS NOT excluded.inode""",
                    (watch, os.fsencode(rel_path), state, inode, dev, size, mtime_ns, ctime_ns,
                     stable_at, now, now, now),
                )
                added += cursor.rowcount
        return added

    def discover_objects(self, watch: str, objects: Iterable[tuple[str, str, str | None, int]],
                         now: float) -> int:
        """Record S3 objects `(rel_path, etag, version_id, size)` as stable arrivals.

        An object version any row already stands for (bar a vanished one) is not new,
        so listing a prefix again, or a repeated event, adds nothing. A key replaced
        before its scan started is updated in place; once scanning, the change is
        found by the scan's or the move's ETag condition. Returns rows added or updated.
        """
        changed = 0
        with self._tx() as conn:
            for rel_path, etag, version_id, size in objects:
                path = os.fsencode(rel_path)
                cursor = conn.execute(
                    f"""INSERT INTO files (watch, rel_path, state, size, etag, version_id,
                                          next_attempt_at, discovered_at, stable_at, updated_at)
                        SELECT ?, ?, 'stable', ?, ?, ?, ?, ?, ?, ?
                        WHERE NOT EXISTS (SELECT 1 FROM files WHERE watch = ? AND rel_path = ?
                                          AND etag = ? AND state != 'gone')
                        ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO UPDATE
                        SET etag = excluded.etag, version_id = excluded.version_id,
                            size = excluded.size, updated_at = excluded.updated_at
                        WHERE files.state IN ('discovered', 'stable')""",
                    (watch, path, size, etag, version_id, now, now, now, now, watch, path, etag),
                )
                changed += cursor.rowcount
        return changed

    def due(self, state: FileState, watch: str, now: float, limit: int) -> list[FileRow]:
        """Rows of `watch` in `state` whose next attempt is due, oldest first."""
        rows = self._conn().execute(
            f"SELECT * FROM files WHERE state = ? AND {_ACTIVE} AND +watch = ? "
            "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
            (str(state), watch, now, limit)).fetchall()
        return [_from_db(r) for r in rows]

    # -- work queue -----------------------------------------------------------------------

    def claim(self, watches: Sequence[str], owner: str, now: float, limit: int) -> list[FileRow]:
        """Take up to `limit` due rows of these watches for `owner`.

        A stable row becomes scanning and spends an attempt; scanning rows waiting for
        an engine, rows with a verdict, and half-done moves keep their state.
        """
        marks = ",".join("?" * len(watches))
        with self._tx() as conn:
            rows = conn.execute(
                f"""UPDATE files SET owner = ?, updated_at = ?,
                        attempts = attempts + (state = 'stable'),
                        state = CASE state WHEN 'stable' THEN 'scanning' ELSE state END
                    WHERE id IN (SELECT id FROM files WHERE {_CLAIMABLE} AND +watch IN ({marks})
                                 AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?)
                    RETURNING *""",
                (owner, now, *watches, now, limit),
            ).fetchall()
        return sorted((_from_db(r) for r in rows), key=lambda r: r.id)

    def claim_id(self, file_id: int, owner: str, now: float) -> FileRow | None:
        """Claim one row now whatever its due time, if nobody else holds it."""
        with self._tx() as conn:
            row = conn.execute(
                f"""UPDATE files SET owner = ?, updated_at = ?,
                        attempts = attempts + (state = 'stable'),
                        state = CASE state WHEN 'stable' THEN 'scanning' ELSE state END
                    WHERE id = ? AND {_CLAIMABLE} RETURNING *""",
                (owner, now, file_id),
            ).fetchone()
        return _from_db(row) if row else None

    def apply(self, changes: Iterable[tuple[int, RowChanges]]) -> None:
        """Write several rows' changes in one transaction (columns by name)."""
        with self._tx() as conn:
            for file_id, fields in changes:
                if unknown := fields.keys() - _WRITABLE:
                    raise ValueError(f"not journal columns: {sorted(unknown)}")
                columns = ", ".join(f"{name} = ?" for name in fields)
                values = [_to_db(name, value) for name, value in fields.items()]
                conn.execute(f"UPDATE files SET {columns}, updated_at = ? WHERE id = ?",
                             (*values, time.time(), file_id))

    def reclaim(self) -> int:
        """Hand back the rows of owners that are no longer running; returns how many."""
        conn = self._conn()
        owners = [r[0] for r in conn.execute(
            "SELECT DISTINCT owner FROM files WHERE owner IS NOT NULL AND " + _ACTIVE)]
        dead = [o for o in owners if not _is_alive(o)]
        if not dead:
            return 0
        marks = ",".join("?" * len(dead))
        with self._tx() as conn:
            # A scan cut off before the engine took it starts over (the attempt stays spent,
            # so a file that crashes the daemon cannot loop forever).
            cursor = conn.execute(
                f"""UPDATE files SET owner = NULL,
                        state = CASE WHEN state = 'scanning' AND engine_scan_id IS NULL
                                     THEN 'stable' ELSE state END
                    WHERE owner IN ({marks}) AND {_ACTIVE}""", dead)
            return cursor.rowcount

    def release(self, owner: str, ids: Sequence[int] | None = None) -> None:
        """Hand back the rows `owner` holds (all, or those of `ids`) that it did not finish."""
        only = "" if ids is None else f" AND id IN ({','.join('?' * len(ids))})"
        with self._tx() as conn:
            conn.execute(
                f"""UPDATE files SET owner = NULL,
                        state = CASE WHEN state = 'scanning' AND engine_scan_id IS NULL
                                     THEN 'stable' ELSE state END,
                        attempts = attempts - (state = 'scanning' AND engine_scan_id IS NULL)
                    WHERE owner = ? AND {_ACTIVE}{only}""", (owner, *(ids or ())))

    def next_due_at(self, watches: Sequence[str]) -> float | None:
        """When the earliest claimable row of these watches is due."""
        marks = ",".join("?" * len(watches))
        row = self._conn().execute(
            f"SELECT min(next_attempt_at) FROM files WHERE {_CLAIMABLE} AND +watch IN ({marks})",
            tuple(watches)).fetchone()
        return row[0] if row else None

    def mark_scan_due(self, engine: str, engine_scan_ids: Sequence[str], now: float) -> int:
        """Make the unclaimed row waiting for one of these scans of `engine` due now.

        A webhook said the scan finished; the worker then polls it once. Rows already
        due, claimed or finished are left alone, so repeated deliveries change nothing.
        Returns how many rows were made due.
        """
        if not engine_scan_ids:
            return 0
        marks = ",".join("?" * len(engine_scan_ids))
        with self._tx() as conn:
            cursor = conn.execute(
                f"""UPDATE files SET next_attempt_at = ?, updated_at = ?
                    WHERE state = 'scanning' AND owner IS NULL AND engine = ?
                      AND engine_scan_id IN ({marks}) AND next_attempt_at > ?""",
                (now, now, engine, *engine_scan_ids, now))
            return cursor.rowcount

    # -- reading ----------------------------------------------------------------------------

    def get(self, file_id: int) -> FileRow | None:
        """One row by id."""
        row = self._conn().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _from_db(row) if row else None

    def active(self, watch: str, rel_path: str) -> FileRow | None:
        """The row of a path still being handled, if any."""
        row = self._conn().execute(
            f"SELECT * FROM files WHERE watch = ? AND rel_path = ? AND {_ACTIVE}",
            (watch, os.fsencode(rel_path))).fetchone()
        return _from_db(row) if row else None

    def is_settled(self, watch: str, rel_path: str, etag: str) -> bool:
        """Whether no row of this object version is still being handled (done, gone or held)."""
        row = self._conn().execute(
            f"SELECT 1 FROM files WHERE watch = ? AND rel_path = ? AND etag = ? AND {_ACTIVE} "
            "AND state != 'held' LIMIT 1", (watch, os.fsencode(rel_path), etag)).fetchone()
        return row is None

    def latest(self, watch: str, rel_path: str) -> FileRow | None:
        """The newest row of a path, in any state."""
        row = self._conn().execute(
            "SELECT * FROM files WHERE watch = ? AND rel_path = ? ORDER BY id DESC LIMIT 1",
            (watch, os.fsencode(rel_path))).fetchone()
        return _from_db(row) if row else None

    def rows(self, *, watch: str | None = None, states: Collection[FileState] | None = None,
             verdict: VerdictKind | None = None, done_since: float | None = None,
             threat: str | None = None, has_error: bool | None = None,
             has_disposition: bool | None = None, order: RowOrder = "id",
             newest_first: bool = False, limit: int = 1000) -> list[FileRow]:
        """Rows passing every filter given (None: not filtered), by `order` then id.

        `threat` is a substring of one of the row's threat names, case-insensitive for
        ASCII (SQL LIKE) and literal: `%`, `_` and `\\` in it are not patterns.
        """
        filters = [
            (watch is not None, "watch = ?", (watch,)),
            (states is not None, f"state IN ({','.join('?' * len(states or ()))})",
             tuple(str(s) for s in states or ())),
            (verdict is not None, "verdict = ?", (str(verdict),)),
            (done_since is not None, "done_at >= ?", (done_since,)),
            (threat is not None, _THREAT_LIKE, (_like_substring(threat or ""),)),
            (has_error is not None,
             "last_error IS NOT NULL" if has_error else "last_error IS NULL", ()),
            (has_disposition is not None,
             "disposition IS NOT NULL" if has_disposition else "disposition IS NULL", ()),
        ]
        where = " AND ".join(["1", *(sql for used, sql, _ in filters if used)])
        params = [value for used, _, values in filters if used for value in values]
        direction = "DESC" if newest_first else "ASC"
        rows = self._conn().execute(
            f"SELECT * FROM files WHERE {where} "
            f"ORDER BY {_ORDER_COLUMNS[order]} {direction}, id {direction} LIMIT ?",
            (*params, limit))
        return [_from_db(r) for r in rows]

    def counts(self) -> list[tuple[str, str, str | None, str | None, int]]:
        """`(watch, state, verdict, reason, count)` for every group of rows."""
        return [tuple(r) for r in self._conn().execute(
            "SELECT watch, state, verdict, reason, count(*) FROM files "
            "GROUP BY watch, state, verdict, reason ORDER BY watch, state")]

    def pending_count(self) -> int:
        """Rows not yet done, gone or held (served by the partial index of active rows)."""
        row = self._conn().execute(
            f"SELECT count(*) FROM files WHERE {_ACTIVE} AND state != 'held'").fetchone()
        return int(row[0])

    def oldest_pending(self) -> dict[str, float]:
        """Per watch, the discovery time of the oldest row not yet done."""
        rows = self._conn().execute(
            "SELECT watch, min(discovered_at) FROM files WHERE state IN "
            f"({','.join('?' * len(ACTIVE_STATES))}) AND state != 'held' GROUP BY watch",
            ACTIVE_STATES)
        return {r[0]: r[1] for r in rows}

    def size_bytes(self) -> int:
        """Bytes on disk of the journal and its WAL."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    # -- engines and audit --------------------------------------------------------------------

    def set_engine_health(self, name: str, healthy: bool, detail: str | None, now: float) -> None:
        """Record the last health probe of an engine."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO engines VALUES (?, ?, ?, ?)",
                         (name, int(healthy), detail, now))

    def engine_health(self) -> dict[str, tuple[bool, str | None, float]]:
        """`name → (healthy, detail, checked_at)` of every engine probed."""
        rows = self._conn().execute("SELECT * FROM engines")
        return {r[0]: (bool(r[1]), r[2], r[3]) for r in rows}

    def audit(self, file_id: int, action: str, actor: str, reason: str,
              detail: str | None, changes: Mapping[str, object], now: float) -> None:
        """Record a quarantine action and its change to the row, atomically."""
        with self._tx() as conn:
            conn.execute("INSERT INTO audit (file_id, at, action, actor, reason, detail) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (file_id, now, action, _text(actor), _text(reason), _to_db("detail", detail)))
            if changes:
                columns = ", ".join(f"{name} = ?" for name in changes)
                values = [_to_db(name, value) for name, value in changes.items()]
                conn.execute(f"UPDATE files SET {columns}, updated_at = ? WHERE id = ?",
                             (*values, now, file_id))

    def audit_trail(self, file_id: int) -> list[AuditRow]:
        """The audited actions on one row, oldest first."""
        rows = self._conn().execute(
            "SELECT file_id, at, action, actor, reason, detail FROM audit "
            "WHERE file_id = ? ORDER BY id", (file_id,))
        return [AuditRow(*r) for r in rows]


# Reading: `Journal.rows` orders by one of these columns and matches threat names one by one.
RowOrder = Literal["id", "done_at", "updated_at"]
_ORDER_COLUMNS: Mapping[str, str] = {"id": "id", "done_at": "done_at", "updated_at": "updated_at"}
_THREAT_LIKE = "EXISTS (SELECT 1 FROM json_each(threats) WHERE value LIKE ? ESCAPE '\\')"


def _like_substring(text: str) -> str:
    """A LIKE pattern (with `ESCAPE '\\'`) matching `text` literally anywhere."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
