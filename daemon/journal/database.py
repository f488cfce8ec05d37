"""The SQLite file under the journal: connections per thread, transactions, migrations, damage.

Any statement, in any thread, that finds the file corrupt or unreadable records it in
`Database.damage`; the service stops on it (docs/operations.md, "When things go wrong").
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.errors import JournalDamagedError, JournalError
from daemon.journal.migrations import SCHEMA as _SCHEMA

__all__ = ["Database", "is_damage", "owner_token", "state_dir_error"]

# Errors that mean the file itself is broken or unreadable, not a busy or full database.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR})
_QUICK_CHECK_ERRORS = 5
# A debug aid of bench/local_throughput.py (--serial): when set, each process appends to
# this file, at `close`, the time its transactions held each file's writers' lock and
# waited for it. Unset (production), `_tx` reads no clock.
_LOCK_STATS = os.environ.get("SCANWATCH_LOCK_STATS")

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
    return pid.isdigit() and _start_time(int(pid)) == start and not _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    """Exited, not yet reaped (a killed worker whose parent died too): it holds nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error means a corrupt or unreadable journal file."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGE_CODES


class _Connection(sqlite3.Connection):
    """A connection whose statements report a damaged file to `on_damage`, from any thread."""

    on_damage: Callable[[sqlite3.DatabaseError], None] | None = None

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        return self.cursor(_Cursor).execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        return self.cursor(_Cursor).executemany(*args, **kwargs)


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

    def executemany(self, *args: Any, **kwargs: Any) -> _Cursor:
        try:
            return super().executemany(*args, **kwargs)
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


class Database:
    """An SQLite file of scanwatch's (the journal, the kept verdicts); safe to share between threads."""

    schema: list[str] = _SCHEMA  # its migrations, in order: `PRAGMA user_version` counts those made

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writers_fd: int | None = None  # opened by the first write (`_tx`)
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
        # Other processes (`workers: N`, docs/operations.md "Throughput") queue on a flock
        # of a file beside the journal, which the kernel frees if its holder dies.
        conn = self._conn()
        asked_at = time.perf_counter() if _LOCK_STATS else 0.0
        with self._write_lock:
            fd = self._writers()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            held_at = time.perf_counter() if _LOCK_STATS else 0.0
            held_cpu_at = time.thread_time() if _LOCK_STATS else 0.0
            try:
                yield from self._in_tx(conn)
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if _LOCK_STATS:
                    self._count_lock(asked_at, held_at, held_cpu_at)

    def _count_lock(self, asked_at: float, held_at: float, held_cpu_at: float) -> None:
        """Time waited for the lock, held (wall), and the CPU used holding it (which leaves out
        waiting for a core while holding it: the serial work itself)."""
        stats = self.__dict__.setdefault("_lock_stats", [0, 0.0, 0.0, 0.0])
        stats[0] += 1
        stats[1] += held_at - asked_at
        stats[2] += time.perf_counter() - held_at
        stats[3] += time.thread_time() - held_cpu_at

    def _in_tx(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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

    def _writers(self) -> int | None:
        """The descriptor of the writers' lock file (None where it cannot be created)."""
        if self._writers_fd is None:
            try:
                self._writers_fd = os.open(f"{self.path}.writers", os.O_RDWR | os.O_CREAT
                                           | os.O_CLOEXEC, 0o640)
            except OSError:
                return None
        return self._writers_fd

    def _migrate(self) -> None:
        # Read first: a write transaction here would queue every `status` behind a drain.
        if self._conn().execute("PRAGMA user_version").fetchone()[0] == len(self.schema):
            return
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(self.schema[version:], start=version + 1):
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

    def close(self) -> None:
        """Close every thread's connection."""
        if _LOCK_STATS and (stats := self.__dict__.pop("_lock_stats", None)):
            with open(_LOCK_STATS, "a") as out:
                out.write(json.dumps({"pid": os.getpid(), "file": self.path.name, "transactions": stats[0],
                                      "waited_s": stats[1], "held_s": stats[2],
                                      "held_cpu_s": stats[3]}) + "\n")
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        if self._writers_fd is not None:
            os.close(self._writers_fd)
            self._writers_fd = None

