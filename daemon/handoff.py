"""Arrivals handed from a local watcher straight to the worker that scans them.

A file found by an event would cost two row writes before its scan: the watcher's
`discover`, then a worker's `claim`. Handed over, it costs one: the worker that receives it
records it claimed (`Journal.take`). Under the journal's writers' lock, which every process
of the daemon queues on, that is the largest share of a file's serial work
(bench/RESULTS.md, "Issue 21"). A file already settled (quiet for `settle_seconds`, always
with `settle_seconds: 0`) is handed over at once and scanned; one that settles within a few
seconds (the default settle period) waits in the watcher until it is due, and is handed
over then, to be looked at once more (daemon/watchers/local.py, daemon/pipeline/settling.py).

The way is one `SOCK_SEQPACKET` socket pair, made before the workers fork and inherited by
each (daemon/workers/pool.py); with `workers: 1` the pipeline's threads read it in the
daemon's own process. A message is one watch's few arrivals, sent and received whole: any
idle thread of any worker takes the next one. Nothing blocks on it: what the socket has no
room for (the workers behind in a burst) waits in the watcher, in order, for at most a few
seconds, and is then recorded by `discover` as before. An arrival on its way is in memory
only, as the watcher's own pending events are: lost with the daemon (its next start's sweep
finds it), or with a worker killed before it recorded it (the daemon sweeps when it reaps
one: daemon/service.py), or else the next periodic sweep finds it.

What is on its way is counted (`on_way`): the daemon's process notes it in the journal every
second, for `status` and the metrics (daemon/journal/arrivals.py).
"""

from __future__ import annotations

import collections
import fcntl
import pickle
import socket
import struct
import termios
import threading

from daemon.fsutil import Identity

__all__ = ["PER_MESSAGE", "Arrival", "Handoff", "OnWay", "add_on_way"]

# An arrival: its rel_path, the identity its `lstat` found, and when (epoch seconds).
Arrival = tuple[str, Identity, float]
# Per watch: how many arrivals, and when the earliest of them was found.
OnWay = dict[str, tuple[int, float]]

PER_MESSAGE = 16  # arrivals a message; a worker's batch takes one to four (daemon/pipeline/__init__.py)
_MAX_MESSAGE = 1 << 16  # longer ones (very deep paths) go to the journal
_SENT_MAX = 4096  # messages counted before those taken are dropped from the count


def add_on_way(on_way: OnWay, watch: str, count: int, found_at: float) -> None:
    """Count `count` more arrivals of `watch` on their way, the earliest found at `found_at`."""
    before, earliest = on_way.get(watch, (0, found_at))
    on_way[watch] = (before + count, min(earliest, found_at))


class Handoff:
    """The socket pair: `offer` from the watchers, `take` from the pipelines' threads."""

    def __init__(self, receiver: socket.socket | None = None) -> None:
        """A new pair, or the receiving end alone (`inherited`)."""
        self._sender: socket.socket | None = None
        if receiver is None:
            self._sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        receiver.setblocking(False)
        self._receiver = receiver
        # The messages sent, oldest first: (bytes, watch, arrivals, earliest found). Those
        # still in the socket are the newest, as many as make up the bytes queued in it:
        # a message is taken whole, and the oldest first.
        self._sent: collections.deque[tuple[int, str, int, float]] = collections.deque()
        self._sent_bytes = 0
        self._lock = threading.Lock()  # the watchers' threads send, the main thread counts

    @classmethod
    def inherited(cls, fd: int) -> Handoff:
        """The receiving end a worker process was started with (daemon/workers/process.py)."""
        return cls(socket.socket(fileno=fd))

    def receiving_fd(self) -> int:
        """The end a worker process inherits."""
        return self._receiver.fileno()

    def offer(self, watch: str, arrivals: list[Arrival], *, settled: bool) -> list[Arrival]:
        """Hand `arrivals` of `watch` to whichever worker is free (`settled`: known settled, else
        due to be looked at once more); returns those the socket has no room for now."""
        assert self._sender is not None, "a worker process only takes"
        for start in range(0, len(arrivals), PER_MESSAGE):
            # Plain tuples: a fifth of the cost of pickling the `Identity`s, in the daemon's
            # own process.
            chunk = [(rel_path, i.dev, i.inode, i.size, i.mtime_ns, i.ctime_ns, found_at)
                     for rel_path, i, found_at in arrivals[start:start + PER_MESSAGE]]
            message = pickle.dumps((watch, settled, chunk), protocol=pickle.HIGHEST_PROTOCOL)
            if len(message) > _MAX_MESSAGE:
                return arrivals[start:]
            with self._lock:
                try:
                    self._sender.send(message, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return arrivals[start:]
                self._sent.append((len(message), watch, len(chunk), min(a[-1] for a in chunk)))
                self._sent_bytes += len(message)
                if len(self._sent) > _SENT_MAX:
                    self._forget_taken()
        return []

    def on_way(self) -> OnWay:
        """Per watch, the arrivals sent that no worker has taken yet, and the earliest found."""
        counts: OnWay = {}
        with self._lock:
            self._forget_taken()
            for _, watch, arrivals, found_at in self._sent:
                add_on_way(counts, watch, arrivals, found_at)
        return counts

    def _forget_taken(self) -> None:
        """Drop the messages taken from the count (under `_lock`)."""
        queued, = struct.unpack("i", fcntl.ioctl(self._receiver.fileno(), termios.FIONREAD, bytes(4)))
        while self._sent_bytes > queued:
            self._sent_bytes -= self._sent.popleft()[0]

    def take(self) -> tuple[str, bool, list[Arrival]] | None:
        """The next message (watch, settled, arrivals), or None if there is none now."""
        try:
            message = self._receiver.recv(_MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return None
        watch, settled, chunk = pickle.loads(message)
        return watch, settled, [(rel_path, Identity(*identity), found_at)
                                for rel_path, *identity, found_at in chunk]

    def close(self) -> None:
        """Close this process's ends."""
        for end in (self._sender, self._receiver):
            if end is not None:
                end.close()
