"""Several scans in flight from one worker thread (docs/engines.md, "Concurrency").

A batch's scanning steps run up to their engine call (`Scanner.begin`). Where the engine
takes several scans at once (its gate a `SendingGate`: clamd), the call is sent and the
step waits in the thread's `Window` while the next rows are opened, hashed and sent; a
step is landed (its reply read, the step finished: `Flight.land`) when the window is
full, when no slot is free without waiting, before a row that may ask an engine some
other way, and at the batch's end, oldest first. So the thread sleeps once for several
replies, not once per file, and most replies it reads are there already (what a wait
costs: bench/RESULTS.md, "Issue 21: the worker's cost per file").

Each scan in flight holds one of the engine's `concurrency` slots (daemon/pipeline/gate.py).
A thread never waits for a slot while it holds one: the window's first scan takes its slot
waiting, the others only a free one, and a row that may take a slot another way (a
multi-engine watch's, or an engine's that cannot send) is started with the window empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from types import TracebackType

from daemon.engines.base import Sent
from daemon.journal import FileRow
from daemon.locations import Locations
from daemon.model import Pending, Verdict
from daemon.pipeline.gate import SendingGate
from daemon.pipeline.outcome import Outcome
from daemon.pipeline.scanning import Asking

__all__ = ["IN_FLIGHT", "Flight", "Window"]

# Scans in flight per worker thread: 4 take most of the wait away (one thread, clamd's
# bare protocol: 33 µs of the client's CPU per scan with 1, 17 with 4, 15 with 12).
IN_FLIGHT = 4


class Flight:
    """A row's scanning step stopped at its engine call, sent to the engine (`send`), then
    finished with its answer (`land`)."""

    def __init__(self, row: FileRow, asking: Asking, gate: SendingGate) -> None:
        self.row = row
        self._asking = asking
        self._gate = gate
        self._sent: Sent | None = None
        self._reply: Callable[[], Verdict | Pending] | None = None

    def send(self, *, wait: bool) -> bool:
        """Send the scan; False when `wait` is False and no slot is free. An error sending it
        is its answer, raised where the step asked when it lands."""
        try:
            sent = self._gate.send(self._asking.call.request, wait=wait)
        except Exception as exc:
            self._reply = _raising(exc)
            return True
        if sent is None:
            return False
        self._sent, self._reply = sent, sent.reply
        return True

    def land(self, row: FileRow, locations: Locations) -> Outcome:
        """The step finished with the scan's answer (its reply read: the slot given back)."""
        if self._reply is None:
            raise RuntimeError(f"file {row.id}: a scan landed before it was sent")
        self._sent = None  # reading the reply ends the scan, whatever happens
        return self._asking.answer(self._reply)

    def cancel(self) -> None:
        """The answer will not be read: its session closed, its slot given back, the bytes let go."""
        try:
            if self._sent is not None:
                self._sent.cancel()
        finally:
            self._sent = None
            self._asking.close()


class Window:
    """One thread's scans in flight for a batch, at most `limit`, landed oldest first by `land`
    (the pipeline's: the row's step finished under its guard). As a context manager: what is
    still in flight at the end is landed, or, if the batch was cut off, cancelled."""

    def __init__(self, land: Callable[[Flight], None], limit: int = IN_FLIGHT) -> None:
        self._land = land
        self._limit = limit
        self._flying: deque[Flight] = deque()

    def send(self, flight: Flight) -> None:
        """Send `flight`, landing the oldest first while the window is full or no slot is free."""
        if len(self._flying) >= self._limit:
            self._land_oldest()
        while not flight.send(wait=not self._flying):
            self._land_oldest()
        self._flying.append(flight)

    def land_all(self) -> None:
        """Land every scan in flight (before a row that may take a slot another way)."""
        while self._flying:
            self._land_oldest()

    def _land_oldest(self) -> None:
        flight = self._flying.popleft()
        try:
            self._land(flight)
        except BaseException:
            flight.cancel()  # cut off before its reply was read: never pooled unread
            raise

    def __enter__(self) -> Window:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.land_all()
        finally:
            while self._flying:
                self._flying.popleft().cancel()


def _raising(exc: Exception) -> Callable[[], Verdict | Pending]:
    def reply() -> Verdict | Pending:
        raise exc
    return reply
