"""An engine's `concurrency`: `limit` slots, in one process or, as slot files each flocked by
one holder, across processes.

With `workers: N` (docs/operations.md, "Throughput") every worker process has its own
threads per engine; a slot is an exclusive `flock` on one of the engine's slot files under
state_dir, which the kernel frees when its holder exits, killed or not. A thread first
takes a free slot without waiting, trying the one it held last first (so that threads
settle on slots of their own and one `flock` is the usual cost); when all are taken it
waits on one of them in turn (never more than `limit` holders, at worst a little longer
a wait than needed). A thread may hold several slots (scans in flight: docs/engines.md,
"Concurrency"), taking each after its first without waiting (`take(wait=False)`), so that
no holder ever waits while it holds a slot.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["EngineSlots", "LocalSlots"]


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
        self.take(wait=True)
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.give(self._held.slot)

    def take(self, wait: bool) -> int | None:
        """A slot, for `give`; None when `wait` is False and none is free."""
        slot = self._try(getattr(self._held, "slot", 0))
        if slot is None and wait:
            slot = self._wait()
        if slot is not None:
            self._held.slot = slot
        return slot

    def give(self, slot: int) -> None:
        """Free a slot of `take`'s."""
        fcntl.flock(self._fds[slot], fcntl.LOCK_UN)
        self._locks[slot].release()

    def _wait(self) -> int:
        slot = next(self._turn)
        self._locks[slot].acquire()
        try:
            fcntl.flock(self._fds[slot], fcntl.LOCK_EX)
        except BaseException:
            self._locks[slot].release()
            raise
        return slot

    def _try(self, first: int) -> int | None:
        """A free slot, looked for from `first` on, without waiting; None if none is."""
        for slot in itertools.chain(range(first, len(self._locks)), range(first)):
            lock = self._locks[slot]
            if not lock.acquire(blocking=False):
                continue
            try:
                fcntl.flock(self._fds[slot], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.release()
                continue
            return slot
        return None

    def close(self) -> None:
        """Close the slot files (no holder may remain)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class LocalSlots:
    """At most `limit` holders at once in this process (`EngineSlots`' `take` and `give`)."""

    def __init__(self, limit: int) -> None:
        self._free = threading.BoundedSemaphore(limit)

    def take(self, wait: bool) -> int | None:
        """A slot, for `give`; None when `wait` is False and none is free."""
        return 0 if self._free.acquire(blocking=wait) else None

    def give(self, slot: int) -> None:
        self._free.release()

    def __enter__(self) -> LocalSlots:
        self._free.acquire()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._free.release()

    def close(self) -> None:
        """Nothing to release."""
