"""Arrivals under a directory tree, read straight from the kernel's inotify (ctypes).

What the local watcher needs is small: a path for each file created, written and
closed, or renamed in; a directory path (ending in `/`) for each directory created or
renamed in, to sweep; and a call when the root itself goes (deleted, moved) or the
kernel queue overflowed, to look at it again and sweep. One thread reads the
descriptor and hands paths over; nothing is paired or queued per event, which is
where watchdog's observer spent a third of the daemon's time in a burst (profiled,
bench/RESULTS.md). Watches are added per directory, by full path: a directory whose
path exceeds PATH_MAX gets none, and its files are found by the periodic sweep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["InotifyReader", "available"]

log = structlog.get_logger("scanwatch.watcher")

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
_MASK = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (of the NUL-padded name after it)
_BUFFER = 1 << 16
# After a read, the events of the next few ms are left to gather, to be read at once: a
# burst is then a few reads, not two per file (each wake-up of this thread costs the daemon's
# process tens of µs), well within the watcher's own wait for a burst (`_FLUSH_S`, 20 ms).
_GATHER_S = 0.005

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_init1: Any = getattr(_libc, "inotify_init1", None)
_add_watch: Any = getattr(_libc, "inotify_add_watch", None)
if _add_watch is not None:
    _add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def available() -> bool:
    """Whether this system has inotify (Linux)."""
    return _init1 is not None and _add_watch is not None


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class InotifyReader:
    """Watches the tree under `root`; calls `on_paths` with the arrivals of each read of the
    descriptor (each path once: a file written in place is created, then closed), `on_root`
    when the root goes."""

    def __init__(self, root: str, on_paths: Callable[[set[str]], None], on_root: Callable[[], None]) -> None:
        self._root = os.fsencode(root)
        self._on_paths = on_paths
        self._on_root = on_root
        self._fd = _check(_init1(os.O_CLOEXEC | os.O_NONBLOCK))
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._dirs: dict[int, bytes] = {}  # watch descriptor -> the directory's full path
        self._root_wd = -1
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)

    def start(self) -> None:
        """Watch the root (raises OSError if it cannot be) and every directory below it."""
        self._root_wd = self._watch(self._root, required=True)
        self._watch_below(self._root)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and close the descriptor."""
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def _watch(self, path: bytes, required: bool = False) -> int:
        wd = _add_watch(self._fd, path, _MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if required:
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            if code not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EACCES):
                log.warning("watch.events_partial", path=os.fsdecode(path), reason=errno.errorcode.get(code))
            return -1
        self._dirs[wd] = path
        return int(wd)

    def _watch_below(self, top: bytes) -> None:
        """Watch every directory below `top` (symlinks not followed; unreadable ones skipped)."""
        pending = [top]
        while pending:
            try:
                with os.scandir(pending.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False) and self._watch(entry.path) >= 0:
                            pending.append(entry.path)
            except OSError:
                continue  # gone, unreadable or too deep: the sweep reports and covers it

    def _run(self) -> None:
        # poll, not select: select refuses descriptors past 1023, which a busy daemon reaches.
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                data = os.read(self._fd, _BUFFER)
            except BlockingIOError:
                continue
            try:
                self._handle(data)
            except Exception:
                log.exception("watch.events_failed", root=os.fsdecode(self._root))
            time.sleep(_GATHER_S)

    def _handle(self, data: bytes) -> None:
        paths: set[str] = set()  # handed over once per read: one lock and wake-up, not one per event
        offset = 0
        while offset < len(data):
            wd, mask, _, size = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size: offset + _HEADER.size + size].rstrip(b"\0")
            offset += _HEADER.size + size
            if mask & IN_Q_OVERFLOW or (wd == self._root_wd and mask & (IN_DELETE_SELF | IN_MOVE_SELF)):
                self._on_root()  # look again and sweep: events were lost, or the root went
            elif mask & IN_IGNORED:
                self._dirs.pop(wd, None)
            elif name and (parent := self._dirs.get(wd)) is not None:
                self._event(parent + b"/" + name, mask, paths)
        if paths:
            self._on_paths(paths)

    def _event(self, path: bytes, mask: int, paths: set[str]) -> None:
        if not mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO):
                paths.add(os.fsdecode(path))
            return
        if mask & (IN_CREATE | IN_MOVED_TO):  # a directory: watch it (and below), then sweep it
            if self._watch(path) >= 0:
                self._watch_below(path)
            paths.add(os.fsdecode(path) + "/")
