"""The local watcher: records arrivals in a directory tree, with the identity each was seen with.

watchdog's callbacks only drop a path into a set; this watcher's own thread turns
the set into journal rows in batches. A start-up sweep and a periodic rescan catch
what events missed (arrivals while stopped, inotify overflow, network filesystems),
so losing the in-memory set loses nothing. A plain file is recorded with the identity of
the `lstat` that found it (an event's, or the sweep's): stable at once if its mtime and
ctime are `settle_seconds` old already (always, with `settle_seconds: 0`), else due when
they will be, when the worker that claims it settles it (daemon/pipeline/settling.py). The
workers are woken per chunk of discovery: a backlog present at start is claimed while the
start-up sweep goes on. An event's plain file is handed to a worker instead (daemon/handoff.py):
settled, or when due if that is within `_HOLD_S`. It waits here till then, and for room in
the socket if the workers are behind; what waits past `_HOLD_S` after it is due, or finds
`MAX_HELD` waiting already, is recorded as above (daemon/watchers/held.py).

The root is opened with `O_NOFOLLOW | O_DIRECTORY` at every step and the tree is
walked through descriptors (daemon/watchers/tree.py), so paths deeper than PATH_MAX
are found too. inotify watches are added by full path, so a subdirectory whose path
exceeds PATH_MAX gets none: files there are found by the periodic sweep. A root that
vanishes or turns into a symlink (or anything but a directory) is reported once and
not watched; it is polled every second, and a real directory back in its place is
watched again and swept at once (docs/operations.md, "Watched folders that move").
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import structlog

from daemon.config import WatchConfig
from daemon.fsutil import Identity, classify
from daemon.handoff import PER_MESSAGE, Arrival, Handoff
from daemon.journal import Journal
from daemon.staging import IN_SOURCE
from daemon.watchers import inotify
from daemon.watchers.base import RepeatFilter, errno_reason, is_ignored, log_discovered, relative_path
from daemon.watchers.fallback import ArrivalsHandler, ArrivalsObserver, ObservedWatch
from daemon.watchers.held import HeldArrivals
from daemon.watchers.tree import is_below, stat_below, walk

__all__ = ["LocalWatcher"]

STAGING_PREFIX = IN_SOURCE + "/"

log = structlog.get_logger("scanwatch.watcher")

_FLUSH_S = 0.02
_CHUNK = 1000
# An event's file that settles this soon waits here, not in the journal, to be handed to a
# worker when due (daemon/handoff.py), and then at most as long again for room.
_HOLD_S = 5.0
_RELEASE_S = 0.005
_ROOT_POLL_S = 1.0  # how soon a missing or unsafe root is looked at again
_NOTE_S = 0.5  # how often the arrivals waiting here are counted (`_note`)
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalWatcher:
    """Watches one local source tree for one watch."""

    def __init__(self, watch: WatchConfig, journal: Journal, wake: threading.Event, *,
                 clock: Callable[[], float] = time.time, handoff: Handoff | None = None) -> None:
        """`handoff`: where an event's arrivals go before the journal, if anywhere."""
        self.watch = watch
        self.journal = journal
        self.wake = wake
        self.handoff = handoff
        self.clock = clock
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._stopping = threading.Event()
        self._observer = None if inotify.available() else ArrivalsObserver()
        self._observed: ObservedWatch | inotify.InotifyReader | None = None
        self._arm_lock = threading.Lock()  # _arm() against stop(); the handler never takes it
        self._thread = threading.Thread(target=self._run, name=f"watch-{watch.name}", daemon=True)
        self._next_rescan_at = 0.0
        self._root_id: tuple[int, int] | None = None  # (dev, inode) of the root being watched
        self._root_stale = False  # inotify said the root was deleted or moved
        self._root_problem: str | None = None
        self._skipped: dict[str, str] = {}  # subtrees reported as skipped: rel_dir -> reason
        self._errors = RepeatFilter(60.0, clock)
        self._held = HeldArrivals()
        self._release_at = 0.0  # the next release, not sooner
        self.waiting: tuple[int, float] = (0, 0.0)  # held arrivals, the earliest found (`_note`)
        self._noted_at = 0.0

    def start(self) -> None:
        """Arm inotify on the root, then sweep what is already there (in the watcher's thread)."""
        self._check_root(self.clock())
        if self._observer is not None:
            self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; arrivals from now on are found by the next start's sweep."""
        with self._arm_lock:
            self._stopping.set()
        self._event.set()
        if isinstance(self._observed, inotify.InotifyReader):
            self._observed.stop()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread.is_alive():  # never started: stepped by hand (a one-shot, a test)
            self._thread.join(5)

    def sweep_soon(self) -> None:
        """Sweep at once: arrivals handed to a worker that died may be recorded nowhere."""
        self._next_rescan_at = 0.0
        self._event.set()

    def _add(self, path: str) -> None:
        self._add_all((path,))

    def _add_all(self, paths: Iterable[str]) -> None:
        with self._lock:
            self._pending.update(paths)
        self._event.set()

    def _root_event(self) -> None:
        self._root_stale = True  # look again at once, and re-arm whatever is there now
        self._event.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception as exc:
                if (held := self._errors.admit(f"{type(exc).__name__}: {exc}")) is not None:
                    log.exception("watch.error", watch=self.watch.name, repeated=held)
            woken = self._event.wait(self._idle_wait_s())
            self._event.clear()
            if woken and not self._stopping.is_set():
                self._stopping.wait(_FLUSH_S)  # let a burst of events gather

    def _idle_wait_s(self) -> float:
        # Held arrivals go in batches at most every `_RELEASE_S`: as they fall due one by one
        # in a burst, a message each would cost a transaction each.
        held_due = max(self._held.next_due(), self._release_at)
        return min(max(min(self._next_rescan_at, held_due) - self.clock(), 0.0), _ROOT_POLL_S)

    def step(self) -> None:
        """Check the root, record pending events, sweep when due."""
        with self._lock:
            paths, self._pending = self._pending, set()
        now = self.clock()
        if now >= self._noted_at + _NOTE_S:
            self._note(now)
        root_fd = self._check_root(now)
        if root_fd is None:
            return  # nothing to record or settle until a real directory is back
        try:
            if now >= self._next_rescan_at:
                self._sweep(root_fd, now)
            elif paths:
                seen: dict[str, Identity] = {}
                self._record(self._entries(root_fd, paths, seen), now, "event", seen)
            self._release(now)
        finally:
            os.close(root_fd)

    def _note(self, now: float) -> None:
        """Note how many arrivals wait here, and the earliest found, for the daemon's main
        thread to count (daemon/service.py)."""
        self.waiting = (len(self._held), self._held.earliest_found())
        self._noted_at = now

    def _check_root(self, now: float) -> int | None:
        """An fd of the root if it is a real directory (re-armed if it changed), else None."""
        try:
            fd = os.open(self.watch.source, _ROOT_FLAGS)
        except OSError as exc:
            self._root_lost(exc)
            return None
        st = os.fstat(fd)
        root_id, self._root_id = self._root_id, (st.st_dev, st.st_ino)
        if root_id != self._root_id or self._root_stale:
            self._root_stale = False
            self._arm()
            if self._root_problem is not None:
                log.info("watch.root_restored", watch=self.watch.name, source=self.watch.source)
            elif root_id not in (None, self._root_id):
                log.info("watch.root_replaced", watch=self.watch.name, source=self.watch.source)
            self._root_problem = None
            self._next_rescan_at = now  # what arrived while it was not watched
        return fd

    def _root_lost(self, exc: OSError) -> None:
        self._root_id = None
        self._disarm()
        self._held.clear()  # the sweep once it is back finds them
        unsafe = exc.errno in (errno.ELOOP, errno.ENOTDIR)
        problem = self._unsafe_kind() if unsafe else errno_reason(exc)
        if problem is None:  # replaced again since the open: the next look says by what
            return
        if problem == self._root_problem:
            return
        self._root_problem = problem
        log.warning("watch.root_unsafe" if unsafe else "watch.root_missing", watch=self.watch.name,
                    source=self.watch.source, reason=problem, error=exc.strerror)

    def _unsafe_kind(self) -> str | None:
        """What the root that could not be opened as a directory is: "symlink" or
        "not_a_directory"; None if it is gone or a directory again already."""
        try:
            mode = os.lstat(self.watch.source).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode):
            return None
        return "symlink" if stat.S_ISLNK(mode) else "not_a_directory"

    def _arm(self) -> None:
        """Watch the root (again) with inotify; a failure leaves it to the sweeps and the root poll."""
        self._disarm()
        handler = ArrivalsHandler(self.watch.source, self._add, self._root_event)
        with self._arm_lock:
            if self._stopping.is_set():
                return
            try:
                if self._observer is None:
                    reader = inotify.InotifyReader(self.watch.source, self._add_all, self._root_event)
                    reader.start()
                    self._observed = reader
                else:
                    self._observed = self._observer.schedule(handler, self.watch.source, recursive=True)
            except OSError as exc:
                log.warning("watch.events_unavailable", watch=self.watch.name,
                            reason=errno_reason(exc), error=exc.strerror)

    def _disarm(self) -> None:
        with self._arm_lock:
            observed, self._observed = self._observed, None
            if isinstance(observed, inotify.InotifyReader):
                observed.stop()
            elif observed is not None and self._observer is not None and not self._stopping.is_set():
                self._observer.unschedule(observed)

    def _sweep(self, root_fd: int, now: float) -> None:
        """Record every file in the tree; the next sweep is scheduled even if this one fails."""
        started = time.monotonic()
        skipped: dict[str, str] = {}
        seen: dict[str, Identity] = {}
        try:
            self._record(walk(root_fd, self._keep, lambda rel, exc: self._skip(rel, exc, skipped),
                              seen=seen), now, "sweep", seen)
            self._skipped = skipped
            gone = self._held_gone(root_fd, now)
        finally:
            self._next_rescan_at = now + self.watch.rescan_interval
        log.debug("watch.swept", watch=self.watch.name, skipped=len(skipped), held_gone=gone,
                  duration_s=round(time.monotonic() - started, 3))

    def _held_gone(self, root_fd: int, now: float) -> int:
        """Record as gone the held paths (a symlink, a hardlink...) no longer there: else an
        uploader making and removing links under new names would grow the journal and the
        skipped count without end (docs/contract.md, "Symlinks, hardlinks and special files")."""
        gone = []
        for file_id, rel_path in self.journal.held_paths(self.watch.name):
            try:
                if not is_below(root_fd, rel_path):
                    gone.append(file_id)
            except OSError:  # not to be looked at now (a folder it may not enter): still held
                continue
        return self.journal.held_gone(gone, now) if gone else 0

    def _keep(self, rel_path: str) -> bool:
        # The staging directory of snapshots is the daemon's, whatever `ignore` says.
        return not (rel_path.startswith(STAGING_PREFIX) or is_ignored(rel_path, self.watch.ignore))

    def _skip(self, rel_dir: str, exc: OSError, seen: dict[str, str]) -> None:
        """Report a subtree that cannot be walked, once for as long as it keeps failing."""
        reason = errno_reason(exc)
        seen[rel_dir] = reason
        if self._skipped.get(rel_dir) != reason:
            self._skipped[rel_dir] = reason
            log.warning("watch.subtree_skipped", watch=self.watch.name, rel_dir=rel_dir or ".",
                        reason=reason, error=exc.strerror)

    def _entries(self, root_fd: int, paths: set[str], seen: dict[str, Identity]
                 ) -> Iterator[tuple[str, int]]:
        """`(rel_path, inode)` of the paths events named; `seen` gets the identities of the
        plain files among them."""
        for path in sorted(paths):
            rel = relative_path(self.watch.source, path.rstrip("/"))
            if rel is None:
                continue
            if path.endswith("/"):
                yield from walk(root_fd, self._keep,
                                lambda r, exc: self._skip(r, exc, self._skipped), rel, seen)
            elif self._keep(rel):
                try:
                    st = stat_below(root_fd, rel)
                except OSError:
                    continue
                if classify(st) is None:
                    seen[rel] = Identity.of(st)
                yield rel, st.st_ino

    def _record(self, entries: Iterator[tuple[str, int]], now: float, how: str,
                seen: dict[str, Identity]) -> None:
        batch: list[tuple[str, int]] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= _CHUNK:
                self._discover(batch, now, how, seen)
        if batch:
            self._discover(batch, now, how, seen)

    def _discover(self, batch: list[tuple[str, int]], now: float, how: str,
                  seen: dict[str, Identity]) -> None:
        """Record one chunk (emptied after). `seen` holds the identities of this chunk only:
        discovery fills it while it yields the chunk's entries. An event's plain files go to
        the workers instead, if they can take them (`_hand`)."""
        if self.handoff is not None and how == "event":
            handed = self._hand(batch, seen, now)
        else:
            handed = False
            if self._held:  # the journal has these from now on
                for rel_path, _ in batch:
                    self._held.drop(rel_path)
        added = self.journal.discover(self.watch.name, batch, now, seen,
                                      self.watch.settle_seconds) if batch else []
        batch.clear()
        seen.clear()
        if added or handed:  # claimable now, or when they will have settled: the workers look
            self.wake.set()
        log_discovered(self.watch.name, added, how)

    def _hand(self, batch: list[tuple[str, int]], seen: dict[str, Identity], now: float) -> bool:
        """Hand an event's plain files to the workers (daemon/handoff.py): the settled ones now,
        or as soon as the socket has room for them; those that settle within `_HOLD_S` when
        they are due. Both wait here meanwhile (`_release`); `batch` keeps the rest, for the
        journal. Whether any was handed now."""
        assert self.handoff is not None
        settle_s = self.watch.settle_seconds
        settled: list[Arrival] = []
        rest: list[tuple[str, int]] = []
        for rel_path, inode in batch:
            self._held.drop(rel_path)  # seen again: due from what it is now
            identity = seen.get(rel_path)
            if identity is None:
                rest.append((rel_path, inode))
                continue
            arrival = (rel_path, identity, now)
            due = identity.settles_at(settle_s, now)
            if due <= now:
                settled.append(arrival)
            elif due > now + _HOLD_S or not self._held.hold(due, arrival, settled=False):
                rest.append((rel_path, inode))
        # Behind those still waiting for room, if any.
        left = settled if self._held.is_due(now) else self.handoff.offer(self.watch.name, settled,
                                                                           settled=True)
        unheld = [arrival for arrival in left if not self._held.hold(now, arrival, settled=True)]
        batch[:] = rest + [(rel_path, identity.inode) for rel_path, identity, _ in unheld]
        return len(left) < len(settled)

    def _release(self, now: float) -> None:
        """Hand the held arrivals now due to the workers, a message at a time while the socket
        has room; one that found no room for `_HOLD_S` after it was due is recorded as it would
        have been when found (due then)."""
        late: list[Arrival] = []
        sent = False
        while self._held.is_due(now):
            assert self.handoff is not None  # only arrivals it could take are held
            due = self._held.pop_due(now, PER_MESSAGE)
            late += [arrival for when, arrival, _ in due if when < now - _HOLD_S]
            chunk = [held for held in due if held[0] >= now - _HOLD_S]
            # Not all known settled: the worker looks once more at each.
            left = self.handoff.offer(self.watch.name, [arrival for _, arrival, _ in chunk],
                                      settled=all(settled for _, _, settled in chunk))
            sent = sent or len(left) < len(chunk)
            if left:  # no room: these are the first to go when there is
                for when, arrival, settled in chunk[len(chunk) - len(left):]:
                    self._held.hold(when, arrival, settled=settled)
                break
        # No room: the socket holds a few hundred milliseconds of the workers' work.
        self._release_at = now + (_FLUSH_S if self._held.is_due(now) else _RELEASE_S)
        if late:
            log_discovered(self.watch.name, self.journal.discover_found(
                self.watch.name, late, self.watch.settle_seconds), "event")
        if sent or late:
            self.wake.set()
