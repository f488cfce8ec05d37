"""The local watcher: records arrivals in a directory tree and marks them stable once settled.

watchdog's callbacks only drop a path into a set; this watcher's own thread turns
the set into journal rows in batches. A start-up sweep and a periodic rescan catch
what events missed (arrivals while stopped, inotify overflow, network filesystems),
so losing the in-memory set loses nothing. A file is stable when its mtime and
ctime are `settle_seconds` old: ctime moves on every write and cannot be set by
the writer, so a writer that pauses shorter than that is waited for.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterator

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, Mask

from daemon.config import WatchConfig
from daemon.errors import UnsafePathError
from daemon.fsutil import DirCache, Identity, classify, split_rel
from daemon.journal import FileRow, Journal
from daemon.model import FileState

__all__ = ["LocalWatcher", "relative_path", "walk"]

log = structlog.get_logger("scanwatch.watcher")

_FLUSH_S = 0.02
_CHUNK = 1000


def relative_path(root: str, path: str) -> str | None:
    """`path` relative to `root` with `/` separators, or None if it is not strictly below it."""
    rel = os.path.relpath(path, root)
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None
    return rel


def is_ignored(rel_path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the basename matches one of the `ignore` globs."""
    name = rel_path.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(root: str, patterns: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """`(rel_path, inode)` of every non-directory below root; symlinked dirs are not entered."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(rel)
                        elif not is_ignored(rel, patterns):
                            yield rel, entry.inode()
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            log.warning("watch.unreadable_dir", root=root, rel_dir=rel_dir, error=str(exc))


class _ArrivalsEmitter(InotifyEmitter):
    """Asks inotify for arrivals only.

    Without IN_MOVED_FROM, a rename into the tree arrives as a created event for its
    new name, and watchdog holds no half-moves to pair: its pairing scans them all per
    event, which made every file we move out of the source cost O(backlog) (profiled).
    """

    def get_event_mask_from_filter(self) -> Mask:
        c = InotifyConstants
        return Mask(c.IN_CREATE | c.IN_CLOSE_WRITE | c.IN_MOVED_TO | c.IN_DELETE_SELF)


class _ArrivalsObserver(BaseObserver):
    def __init__(self) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(_ArrivalsEmitter, inotify_fd=self._inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _Handler(FileSystemEventHandler):
    """Collects paths from watchdog's thread; does nothing slow."""

    def __init__(self, on_path: Callable[[str], None]) -> None:
        self._on_path = on_path

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            # A directory moved in brings files no event will name: sweep it.
            if isinstance(event, FileMovedEvent | FileCreatedEvent):
                self._on_path(os.fsdecode(event.dest_path or event.src_path) + "/")
            return
        if isinstance(event, FileMovedEvent):
            self._on_path(os.fsdecode(event.dest_path))
        elif isinstance(event, FileClosedEvent | FileCreatedEvent):
            self._on_path(os.fsdecode(event.src_path))


class LocalWatcher:
    """Watches one local source tree for one watch."""

    def __init__(self, watch: WatchConfig, journal: Journal, wake: threading.Event, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.watch = watch
        self.journal = journal
        self.wake = wake
        self.clock = clock
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._stopping = threading.Event()
        self._observer = _ArrivalsObserver()
        self._thread = threading.Thread(target=self._run, name=f"watch-{watch.name}", daemon=True)
        self._next_rescan_at = 0.0

    def start(self) -> None:
        """Arm inotify, then sweep what is already there (in the watcher's thread)."""
        self._observer.schedule(_Handler(self._add), self.watch.source, recursive=True)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; arrivals from now on are found by the next start's sweep."""
        self._stopping.set()
        self._event.set()
        self._observer.stop()
        self._observer.join(5)
        self._thread.join(5)

    def _add(self, path: str) -> None:
        with self._lock:
            self._pending.add(path)
        self._event.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception:
                log.exception("watch.error", watch=self.watch.name)
            self._event.wait(self._idle_wait_s())
            self._event.clear()
            if not self._stopping.is_set():
                self._stopping.wait(_FLUSH_S)  # let a burst of events gather

    def _idle_wait_s(self) -> float:
        due = [self._next_rescan_at]
        row = self.journal.due(FileState.DISCOVERED, self.watch.name, float("inf"), 1)
        if row:
            due.append(row[0].next_attempt_at)
        return min(max(min(due) - self.clock(), 0.0), 5.0)

    def step(self) -> None:
        """Record pending events, sweep when due, then settle what is due."""
        with self._lock:
            paths, self._pending = self._pending, set()
        now = self.clock()
        if now >= self._next_rescan_at:
            self._record(walk(self.watch.source, self.watch.ignore), now, "sweep")
            self._next_rescan_at = now + self.watch.rescan_interval
        elif paths:
            self._record(self._entries(paths), now, "event")
        self.settle()

    def _entries(self, paths: set[str]) -> Iterator[tuple[str, int]]:
        for path in sorted(paths):
            rel = relative_path(self.watch.source, path.rstrip("/"))
            if path.endswith("/"):
                if rel is not None:
                    prefix = rel + "/"
                    yield from ((prefix + r, i) for r, i in walk(path, self.watch.ignore))
                continue
            if rel is None or is_ignored(rel, self.watch.ignore):
                continue
            try:
                yield rel, os.lstat(path).st_ino
            except OSError:
                continue

    def _record(self, entries: Iterator[tuple[str, int]], now: float, how: str) -> None:
        added = 0
        batch: list[tuple[str, int]] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= _CHUNK:
                added += self.journal.discover(self.watch.name, batch, now)
                batch.clear()
        if batch:
            added += self.journal.discover(self.watch.name, batch, now)
        if added:
            log.info("file.discovered", watch=self.watch.name, count=added, by=how)

    def settle(self) -> int:
        """Mark due discovered rows stable, held or gone; returns how many became stable."""
        rows = self.journal.due(FileState.DISCOVERED, self.watch.name, self.clock(), _CHUNK)
        changes: list[tuple[int, dict[str, object]]] = []
        stable = 0
        with DirCache() as dirs:
            for row in rows:
                change = self._settle_one(row, dirs)
                changes.append((row.id, change))
                stable += change.get("state") is FileState.STABLE
        if changes:
            self.journal.apply(changes)
        if stable:
            self.wake.set()
        return stable

    def _settle_one(self, row: FileRow, dirs: DirCache) -> dict[str, object]:
        now = self.clock()
        context = {"watch": row.watch, "rel_path": row.rel_path, "file_id": row.id}
        parents, name = split_rel(row.rel_path)
        try:
            st = os.stat(name, dir_fd=dirs.open(self.watch.source, parents), follow_symlinks=False)
        except UnsafePathError as exc:
            log.warning("file.skipped", reason="symlink", detail=str(exc), **context)
            return {"state": FileState.HELD, "reason": "symlink", "done_at": now}
        except FileNotFoundError:
            log.info("file.vanished", **context)
            return {"state": FileState.GONE, "done_at": now}
        if reason := classify(st):
            log.warning("file.skipped", reason=reason.value, **context)
            return {"state": FileState.HELD, "reason": reason, "inode": st.st_ino, "done_at": now}
        identity = Identity.of(st)
        quiet_since = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        unchanged = identity == row.identity
        # A clock ahead of ours (network filesystems) must not hold a file for ever:
        # unchanged across a whole settle period is settled too.
        settled = (now - quiet_since >= self.watch.settle_seconds
                   or (unchanged and now - row.updated_at >= self.watch.settle_seconds))
        fields: dict[str, object] = {
            "dev": identity.dev, "inode": identity.inode, "size": identity.size,
            "mtime_ns": identity.mtime_ns, "ctime_ns": identity.ctime_ns}
        if settled:
            return {**fields, "state": FileState.STABLE, "stable_at": now, "next_attempt_at": now}
        wait_s = min(max(quiet_since + self.watch.settle_seconds - now, 0.05),
                     self.watch.settle_seconds)
        return {**fields, "next_attempt_at": now + wait_s}
