"""A worker's intake of the arrivals a watcher handed over (daemon/handoff.py): the next
messages, recorded as the worker's own rows (`Journal.take`), before the journal's due rows
are claimed (daemon/pipeline/__init__.py)."""

from __future__ import annotations

import itertools
import threading

from daemon.config import Config
from daemon.faults import pause
from daemon.handoff import Arrival, Handoff
from daemon.journal import FileRow, Journal
from daemon.s3url import is_s3
from daemon.watchers.base import log_discovered

__all__ = ["Intake"]

# Handed messages (of up to 16 files) a batch takes when the socket holds them, by the type
# of the watch's engine. A batch's own costs (three transactions, each writing the pages its
# rows share, the destination folders' fsyncs, a frame to the daemon) are a large part of a
# file's with YARA: shared by up to 64 files, under the journal's lock 0.062 -> 0.042 ms per
# file. clamd, with several scans in flight per thread, went fastest with 32 (with 16 or 64,
# 0.75 - 0.91x the files a second). An HTTP engine's thread scans a batch's files one after
# another, for seconds each: one message (bench/RESULTS.md, "Issue 21"). Claims stay at 16
# rows: 64 drained a backlog present at start 0.88x as fast with YARA.
_MESSAGES = {"yara": 4, "clamav": 2}


class Intake:
    """Takes handed arrivals for one worker (`owner`): shared by its threads."""

    def __init__(self, config: Config, journal: Journal, owner: str, wake: threading.Event) -> None:
        """`wake`: set when rows become claimable (another engine's arrivals, revived paths)."""
        self.config = config
        self.journal = journal
        self.owner = owner
        self.wake = wake
        self._messages = {w.name: min(_MESSAGES.get(config.engines[e].type, 1) for e in w.engines)
                          for w in config.watches if not is_s3(w.source)}  # the local watches

    def take(self, handoff: Handoff, watches: list[str], now: float) -> list[FileRow]:
        """The next arrivals handed over for `watches`, recorded as this worker's: one
        message, or as many as its watch's engine takes (`_MESSAGES`) when the socket holds them."""
        if self._messages.keys().isdisjoint(watches):
            return []
        handed: dict[str, tuple[bool, list[Arrival]]] = {}  # watch -> all settled, arrivals
        for count in itertools.count(1):
            message = handoff.take()
            if message is None:
                break
            watch, settled, arrivals = message
            was_settled, before = handed.get(watch, (True, []))
            handed[watch] = (was_settled and settled, before + arrivals)
            if watch not in watches or count >= self._messages[watch]:
                break
        if handed:
            pause("arrivals.taken")  # tests: a worker killed here had them only in memory
        rows: list[FileRow] = []
        for watch, (settled, arrivals) in handed.items():
            if watch not in watches:  # another engine's watch (or one a reload removed): the journal
                if watch in self._messages:
                    added = self.journal.discover(watch, [(rel, i.inode) for rel, i, _ in arrivals], now)
                    log_discovered(watch, added, "event")
                    self.wake.set()
                continue
            taken, added = self.journal.take(watch, arrivals, self.owner, now, settled=settled)
            log_discovered(watch, [row.rel_path for row in taken] + added, "event")
            if added:
                self.wake.set()
            rows += taken
        return rows
