"""An engine's one gate: at most `concurrency` calls at once, from any number of workers.

The pipeline builds one per engine (docs/engines.md, "Concurrency"): a single-engine
watch's workers and a multi-engine watch's fan-out go through it alike, and with several
worker processes (`workers` > 1) its slots are the slot files under state_dir that every
process shares (daemon/slots.py). An engine that takes several scans at once from one
thread (`SendingEngine`: clamd) has a `SendingGate`, where each scan sent holds a slot of
its own until its reply is read: scans in flight count one each, whichever thread sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from daemon.engines.base import (
    Engine,
    ScanHandle,
    ScanRequest,
    SendingEngine,
    Sent,
    Signatures,
    signatures_of,
)
from daemon.model import Pending, Verdict
from daemon.slots import EngineSlots, LocalSlots

__all__ = ["Gate", "SendingGate", "gate"]


class Gate:
    """An engine whose scans and polls run at most `limit` at once (the one owner of its
    concurrency; its rate pacing stays in its HTTP client)."""

    def __init__(self, engine: Engine, slots: EngineSlots | LocalSlots) -> None:
        self.engine = engine
        self._slots = slots

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def remote(self) -> bool:
        return self.engine.remote

    @property
    def reads_s3(self) -> bool:
        return self.engine.reads_s3

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        with self._slots:
            return self.engine.scan(request)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        with self._slots:
            return self.engine.poll(scan)

    def probe(self) -> str:
        return self.engine.probe()

    def signatures(self) -> Signatures:
        return signatures_of(self.engine)

    def close(self) -> None:
        self.engine.close()
        self._slots.close()


class SendingGate(Gate):
    """The gate of an engine that takes several scans at once from one thread."""

    def __init__(self, engine: Engine, sender: SendingEngine, slots: EngineSlots | LocalSlots) -> None:
        super().__init__(engine, slots)
        self._sender = sender

    def send(self, request: ScanRequest, *, wait: bool) -> Sent | None:
        """The scan sent, holding a slot until its reply is read or it is cancelled; None when
        `wait` is False and no slot is free. Raises what the engine's `send` raises, the slot
        given back."""
        slot = self._slots.take(wait)
        if slot is None:
            return None
        try:
            sent = self._sender.send(request)
        except BaseException:
            self._slots.give(slot)
            raise
        return _Held(sent, partial(self._slots.give, slot))


class _Held:
    """A scan sent and the slot it holds, given back once its reply is read or it is cancelled."""

    def __init__(self, sent: Sent, give: Callable[[], None]) -> None:
        self._sent = sent
        self._give = give

    def reply(self) -> Verdict | Pending:
        try:
            return self._sent.reply()
        finally:
            self._give()

    def cancel(self) -> None:
        try:
            self._sent.cancel()
        finally:
            self._give()


def gate(engine: Engine, limit: int, shared: EngineSlots | None = None) -> Gate:
    """`engine` behind its gate of `limit` slots, or of the `shared` slot files."""
    slots = shared or LocalSlots(limit)
    if isinstance(engine, SendingEngine):
        return SendingGate(engine, engine, slots)
    return Gate(engine, slots)
