"""An engine's `concurrency` held across processes: `limit` slot files, each flocked by one holder.

With `workers: N` (docs/operations.md, "Throughput") every worker process has its own
threads per engine; a slot is an exclusive `flock` on one of the engine's slot files under
state_dir, which the kernel frees when its holder exits, killed or not. A thread first
takes a free slot without waiting, trying the one it held last first (so that threads
settle on slots of their own and one `flock` is the usual cost); when all are taken it
waits on one of them in turn (never more than `limit` holders, at worst a little longer
a wait than needed).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["EngineSlots"]


class EngineSlots:
    """At most `limit` holders at once over every process that uses `directory` and `engine`."""

    def __init__(self, directory: Path, engine: str, limit: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # flock is per open file: one descriptor per slot, one thread of ours at a time on it.
        self._fds = [os.open(directory / f"{engine}.{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o600) for i in range(limit)]
        self._locks = [threading.Lock() for _ in range(limit)]
        self._turn = itertools.cycle(range(limit))
        self._held = threading.local()

    def __enter__(self) -> EngineSlots:
        self._held.slot = self._acquire()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        slot: int = self._held.slot
        fcntl.flock(self._fds[slot], fcntl.LOCK_UN)
        self._locks[slot].release()

    def _acquire(self) -> int:
        last: int = getattr(self._held, "slot", 0)
        for slot in itertools.chain(range(last, len(self._locks)), range(last)):
            lock = self._locks[slot]
            if not lock.acquire(blocking=False):
                continue
            try:
                fcntl.flock(self._fds[slot], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.release()
                continue
            return slot
        slot = next(self._turn)
        self._locks[slot].acquire()
        try:
            fcntl.flock(self._fds[slot], fcntl.LOCK_EX)
        except BaseException:
            self._locks[slot].release()
            raise
        return slot

    def close(self) -> None:
        """Close the slot files (no holder may remain)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
