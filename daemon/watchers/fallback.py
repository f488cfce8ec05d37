"""watchdog's inotify observer, for where inotify cannot be read directly (daemon/watchers/inotify.py).

It asks for arrivals only and hands their paths over without doing anything slow.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, Mask
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent

__all__ = ["ArrivalsHandler", "ArrivalsObserver", "ObservedWatch"]


class _ArrivalsEmitter(InotifyEmitter):
    """Asks inotify for arrivals only, plus the root's own deletion or move.

    Without IN_MOVED_FROM, a rename into the tree arrives as a created event for its
    new name, and watchdog holds no half-moves to pair: its pairing scans them all per
    event, which made every file we move out of the source cost O(backlog) (profiled).
    watchdog 7 reports IN_DELETE_SELF of the root (and stops the emitter) but drops
    IN_MOVE_SELF; a root renamed away would go on reporting under its old name.
    """

    def get_event_mask_from_filter(self) -> Mask:
        c = InotifyConstants
        return Mask(c.IN_CREATE | c.IN_CLOSE_WRITE | c.IN_MOVED_TO | c.IN_DELETE_SELF
                    | c.IN_MOVE_SELF | c.IN_ONLYDIR)

    def build_and_queue_event(self, event: GroupedInotifyEvent, *, full_events: bool = False) -> None:
        if (isinstance(event, PathedInotifyEvent) and event.ev.is_move_self
                and event.path == os.fsencode(self.watch.path)):
            self.queue_event(DirMovedEvent(self.watch.path, ""))
            return
        super().build_and_queue_event(event, full_events=full_events)


class ArrivalsObserver(BaseObserver):
    """watchdog's observer, where inotify cannot be read directly (daemon/watchers/inotify.py)."""

    def __init__(self) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(_ArrivalsEmitter, inotify_fd=self._inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class ArrivalsHandler(FileSystemEventHandler):
    """Collects paths from watchdog's thread; does nothing slow."""

    def __init__(self, root: str, on_path: Callable[[str], None], on_root: Callable[[], None]) -> None:
        self._root = root
        self._on_path = on_path
        self._on_root = on_root

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if (isinstance(event, DirDeletedEvent | DirMovedEvent)
                    and os.fsdecode(event.src_path) == self._root):
                self._on_root()
            # A directory moved in brings files no event will name: sweep it.
            elif isinstance(event, DirMovedEvent | DirCreatedEvent):
                self._on_path(os.fsdecode(event.dest_path or event.src_path) + "/")
            return
        if isinstance(event, FileMovedEvent):
            self._on_path(os.fsdecode(event.dest_path))
        elif isinstance(event, FileClosedEvent | FileCreatedEvent):
            self._on_path(os.fsdecode(event.src_path))
