"""The arrivals a local watcher holds in memory on their way to a worker (daemon/handoff.py):
each until it is due (settled), then until the handoff's socket has room, in due order
(daemon/watchers/local.py)."""

from __future__ import annotations

import heapq
import math

from daemon.handoff import Arrival

__all__ = ["MAX_HELD", "HeldArrivals"]

MAX_HELD = 10_000  # at most so many at once: past them, the journal records arrivals

# When due, the arrival, and whether it had settled when it was found.
Held = tuple[float, Arrival, bool]


class HeldArrivals:
    """Arrivals by rel_path, and a heap of (due, rel_path) in due order whose entries for a
    path held again since (due later) or dropped are skipped. Used by one thread."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._due: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, due: float, arrival: Arrival, *, settled: bool) -> bool:
        """Keep `arrival` until `due`; False if `MAX_HELD` are held already."""
        if len(self._held) >= MAX_HELD:
            return False
        self._held[arrival[0]] = (due, arrival, settled)
        heapq.heappush(self._due, (due, arrival[0]))
        return True

    def drop(self, rel_path: str) -> None:
        """Forget the arrival of `rel_path`, if held: seen again, or recorded in the journal."""
        self._held.pop(rel_path, None)

    def clear(self) -> None:
        """Forget them all (the watched root lost: its sweep, once back, finds them)."""
        self._held.clear()
        self._due.clear()

    def next_due(self) -> float:
        """When the next one is due, at the earliest; inf if none is held."""
        return self._due[0][0] if self._held else math.inf

    def is_due(self, now: float) -> bool:
        """Whether one is due by `now` (or a skipped entry's time has come)."""
        return bool(self._due) and self._due[0][0] <= now

    def pop_due(self, now: float, most: int) -> list[Held]:
        """Up to `most` of those due by `now`, the earliest first, no longer held."""
        popped: list[Held] = []
        while len(popped) < most and self.is_due(now):
            due, rel_path = heapq.heappop(self._due)
            held = self._held.get(rel_path)
            if held is not None and held[0] == due:
                del self._held[rel_path]
                popped.append(held)
        return popped

    def earliest_found(self) -> float:
        """When the earliest of them was found (0.0 if none is held)."""
        return min((arrival[2] for _, arrival, _ in self._held.values()), default=0.0)
