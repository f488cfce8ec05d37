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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from daemon.errors import JournalDamagedError, JournalError
from daemon.fsutil import Identity
from daemon.model import ACTIVE_STATES, FileState, RowChanges, ScanChanges, ScanRecord, VerdictKind

__all__ = ["AuditRow", "FileRow", "FleetMember", "Journal", "RowChanges", "RowOrder", "is_damage",
           "open_journal", "owner_token", "state_dir_error"]

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
]

# Errors that mean the file itself is broken or unreadable, not a busy or full database.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR})
_QUICK_CHECK_ERRORS = 5

_JSON_COLUMNS = ("threats", "raw_result")
_PATH_COLUMNS = ("rel_path", "destination", "dest_rel")
_ACTIVE = "state NOT IN ('done', 'gone')"
# A claimed row, in any state, is its owner's until it commits it with `owner = NULL`
# (or `reclaim` finds the owner dead): never two workers on one file.
# Queries of the work queue write `+watch`: the unary plus keeps SQLite from picking the
# watch index (every row of the watch, done ones too) over the due-ordered partial ones.
_CLAIMABLE = "(state IN ('stable', 'verdict', 'scanning', 'moving') AND owner IS NULL)"


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


def _is_io_of_dir(path: Path, exc: BaseException) -> bool:
    """An I/O error creating files beside the journal (a read-only state_dir), not a bad file."""
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF == sqlite3.SQLITE_IOERR and not os.access(path.parent, os.W_OK)


def _is_alive(token: str) -> bool:
    pid, _, start = token.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error means a corrupt or unreadable journal file."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGE_CODES


class _Connection(sqlite3.Connection):
    """A connection whose statements report a damaged file to `on_damage`, from any thread."""

    on_damage: Callable[[sqlite3.DatabaseError], None] | None = None

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        return self.cursor(_Cursor).execute(*args, **kwargs)


class _Cursor(sqlite3.Cursor):
    """Rows are read step by step: a damaged page can surface at any fetch, not only at execute."""

    def _watch(self, exc: sqlite3.DatabaseError) -> None:
        connection = self.connection
        if is_damage(exc) and isinstance(connection, _Connection) and connection.on_damage:
            connection.on_damage(exc)

    def execute(self, *args: Any, **kwargs: Any) -> _Cursor:
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            self._watch(exc)
            raise

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as exc:
            self._watch(exc)
            raise

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as exc:
            self._watch(exc)
            raise

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.DatabaseError as exc:
            self._watch(exc)
            raise


def _lost_wal(path: Path) -> str | None:
    """Why the journal lost committed history, if its WAL was removed after an unclean stop.

    SQLite deletes `-wal` and then `-shm` when the last connection closes cleanly; after
    a crash both stay. A `-shm` without its `-wal` means the WAL, and the transactions
    not yet copied into the main file, were removed (docs/operations.md: its limits).
    """
    if Path(f"{path}-shm").exists() and not Path(f"{path}-wal").exists():
        return (f"{path.name}-shm is there but {path.name}-wal is missing: the write-ahead log of an "
                "unclean stop was removed and the history it held is lost")
    return None


def state_dir_error(state_dir: Path, cause: BaseException) -> JournalError:
    """The one-line error for a state_dir the daemon cannot create or write in."""
    return JournalError(f"state_dir {state_dir} is not usable ({cause}); make it a writable "
                        "directory of the user scanwatch runs as (docs/operations.md)")


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


def _update_file(conn: sqlite3.Connection, file_id: int, fields: RowChanges) -> None:
    if unknown := fields.keys() - _WRITABLE:
        raise ValueError(f"not journal columns: {sorted(unknown)}")
    columns = ", ".join(f"{name} = ?" for name in fields)
    values = [_to_db(name, value) for name, value in fields.items()]
    conn.execute(f"UPDATE files SET {columns}, updated_at = ? WHERE id = ?",
                 (*values, time.time(), file_id))


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
        self.damage: str | None = None  # set by the first statement, in any thread, that finds it
        if lost := _lost_wal(self.path):
            raise JournalDamagedError(f"the journal {self.path} is damaged: {lost}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._migrate()
        except (OSError, sqlite3.Error, JournalError) as exc:
            cause = exc.__cause__ if isinstance(exc, JournalError) else exc
            if cause is not None and is_damage(cause) and not _is_io_of_dir(self.path, cause):
                raise JournalDamagedError(f"the journal {self.path} is damaged: {cause}") from exc
            raise state_dir_error(self.path.parent, cause or exc) from exc

    # -- plumbing -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0, factory=_Connection)
            conn.on_damage = self._on_damage
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

    def _on_damage(self, exc: sqlite3.DatabaseError) -> None:
        if self.damage is None:
            self.damage = str(exc)

    def quick_check(self) -> str | None:
        """What `PRAGMA quick_check` finds wrong (its first few findings), or None if sound.

        It reads every page once without checking indexes against tables: linear in the
        file's size (docs/operations.md gives its time on a large journal).
        """
        try:
            rows = self._conn().execute(f"PRAGMA quick_check({_QUICK_CHECK_ERRORS})").fetchall()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        findings = [str(r[0]) for r in rows]
        return None if findings == ["ok"] else "; ".join(findings)

    def restore(self, rows: Iterable[Mapping[str, object]]) -> int:
        """Insert finished rows (column → value) rebuilt from elsewhere; returns how many."""
        count = 0
        with self._tx() as conn:
            for row in rows:
                columns = ", ".join(row)
                conn.execute(f"INSERT INTO files ({columns}) VALUES ({','.join('?' * len(row))})",
                             [_to_db(name, value) for name, value in row.items()])
                count += 1
        return count

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
                _update_file(conn, file_id, fields)

    def apply_scans(self, file_id: int, changes: RowChanges,
                    scans: Mapping[str, ScanChanges]) -> None:
        """Write a file row's changes and its engines' scan records in one transaction.

        A record given a `sha256` other than its own is of new bytes: it starts afresh.
        """
        with self._tx() as conn:
            if changes:
                _update_file(conn, file_id, changes)
            for engine, fields in scans.items():
                if unknown := fields.keys() - _SCAN_WRITABLE:
                    raise ValueError(f"not scan record columns: {sorted(unknown)}")
                if "sha256" in fields:
                    conn.execute("DELETE FROM scans WHERE file_id = ? AND engine = ? AND sha256 != ?",
                                 (file_id, engine, fields["sha256"]))
                    conn.execute("INSERT OR IGNORE INTO scans (file_id, engine, sha256) VALUES (?, ?, ?)",
                                 (file_id, engine, fields["sha256"]))
                columns = ", ".join(f"{name} = ?" for name in fields)
                values = [_to_db(name, value) for name, value in fields.items()]
                conn.execute(f"UPDATE scans SET {columns} WHERE file_id = ? AND engine = ?",
                             (*values, file_id, engine))

    def scans(self, file_id: int) -> dict[str, ScanRecord]:
        """A file's scan records by engine (watches with several engines)."""
        rows = self._conn().execute("SELECT * FROM scans WHERE file_id = ?", (file_id,)).fetchall()
        records = {}
        for row in rows:
            values = dict(row)
            values["threats"] = json.loads(values["threats"]) if values["threats"] else None
            values["verdict"] = VerdictKind(values["verdict"]) if values["verdict"] else None
            values["abandoned"] = bool(values["abandoned"])
            records[values["engine"]] = ScanRecord(**values)
        return records

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
                    WHERE state = 'scanning' AND owner IS NULL AND next_attempt_at > ?
                      AND ((engine = ? AND engine_scan_id IN ({marks}))
                           OR id IN (SELECT file_id FROM scans WHERE engine = ?
                                     AND engine_scan_id IN ({marks})))""",
                (now, now, now, engine, *engine_scan_ids, engine, *engine_scan_ids))
            conn.execute(f"UPDATE scans SET next_attempt_at = ? WHERE engine = ? AND verdict IS NULL "
                         f"AND engine_scan_id IN ({marks}) AND next_attempt_at > ?",
                         (now, engine, *engine_scan_ids, now))
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

    def set_fleet(self, watch: str, member: FleetMember) -> None:
        """Record this daemon's part in a fleet watch: its lease, the messages it holds."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO fleet VALUES (?, ?, ?, ?, ?)",
                         (watch, member.holder, member.lease_until, member.messages_held,
                          member.updated_at))

    def fleet(self) -> dict[str, FleetMember]:
        """`watch → FleetMember` of the fleet watches this daemon ran."""
        rows = self._conn().execute("SELECT * FROM fleet")
        return {r[0]: FleetMember(r[1], r[2], r[3], r[4]) for r in rows}

    def audit(self, file_id: int, action: str, actor: str, reason: str,
              detail: str | None, changes: Mapping[str, object], now: float) -> None:
        """Record a quarantine action and its change to the row, atomically."""
        with self._tx() as conn:
            _audit(conn, file_id, action, actor, reason, detail, changes, now)

    def audit_trail(self, file_id: int) -> list[AuditRow]:
        """The audited actions on one row, oldest first."""
        rows = self._conn().execute(
            "SELECT file_id, at, action, actor, reason, detail FROM audit "
            "WHERE file_id = ? ORDER BY id", (file_id,))
        return [AuditRow(*r) for r in rows]

    # -- rescans of clean destinations (daemon/rescan.py) ---------------------------------------

    def rescan(self, watch: str, now: float) -> tuple[int, dict[str, tuple[str, int | None, Any]]]:
        """The unfinished rescan of `watch` (a new one if none) and what it did so far:
        `rel_path → (outcome, file_id, plan)`."""
        with self._tx() as conn:
            found = conn.execute("SELECT id FROM rescans WHERE watch = ? AND finished_at IS NULL "
                                 "ORDER BY id DESC LIMIT 1", (watch,)).fetchone()
            rescan_id = int(found[0]) if found else int(conn.execute(
                "INSERT INTO rescans (watch, started_at) VALUES (?, ?)", (watch, now)).lastrowid or 0)
            rows = conn.execute("SELECT rel_path, outcome, file_id, plan FROM rescan_files "
                                "WHERE rescan_id = ?", (rescan_id,)).fetchall()
        return rescan_id, {os.fsdecode(r[0]): (r[1], r[2], json.loads(r[3]) if r[3] else None)
                           for r in rows}

    def rescan_record(self, rescan_id: int, rel_path: str, outcome: str, file_id: int | None = None,
                      plan: Mapping[str, Any] | None = None) -> None:
        """Record what the rescan did to `rel_path` (or, `plan`, is about to do)."""
        with self._tx() as conn:
            _rescan_record(conn, rescan_id, rel_path, outcome, file_id, plan)

    def rescan_audited(self, rescan_id: int, rel_path: str, outcome: str, file_id: int,
                       audit: tuple[str, str, str, str | None], changes: Mapping[str, object],
                       now: float) -> None:
        """The rescan's move of `rel_path` done: its audit row, row change and outcome, atomically."""
        with self._tx() as conn:
            _audit(conn, file_id, *audit, changes, now)
            _rescan_record(conn, rescan_id, rel_path, outcome, file_id, None)

    def rescan_finish(self, rescan_id: int, now: float) -> None:
        """Mark a rescan finished: the next one starts afresh."""
        with self._tx() as conn:
            conn.execute("UPDATE rescans SET finished_at = ? WHERE id = ?", (now, rescan_id))

    def placed_row(self, watch: str, destination: str) -> FileRow | None:
        """The newest finished row of a file placed at `destination`."""
        row = self._conn().execute(
            "SELECT * FROM files WHERE watch = ? AND destination = ? AND state = 'done' "
            "ORDER BY id DESC LIMIT 1", (watch, os.fsencode(destination))).fetchone()
        return _from_db(row) if row else None

    def add_done(self, row: Mapping[str, object]) -> int:
        """Insert one finished row (column → value); its id."""
        with self._tx() as conn:
            cursor = conn.execute(f"INSERT INTO files ({', '.join(row)}) VALUES ({','.join('?' * len(row))})",
                                  [_to_db(name, value) for name, value in row.items()])
        return int(cursor.lastrowid or 0)


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
