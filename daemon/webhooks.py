"""Webhook receivers: vendors announce finished scans, and the announced file is polled now.

A verified delivery never writes a verdict from its body: it makes the journal row
that waits for that engine scan due at once and wakes the pipeline, whose worker
then asks the engine through its authenticated API. So a forged or replayed event
can at worst cause one early poll, and every delivery is idempotent. Polling stays
the safety net: while deliveries arrive (`WebhookHealth`), engines only poll slower.

One threaded HTTP server per distinct `listen` address routes `POST /webhooks/<engine>`
to each engine that is a `WebhookSource` (daemon/engines/base.py) with an address. The
engine verifies the delivery and names its scan ids: each vendor's wire format (Blazelock's
signed events, Perception Point's callbacks) lives in its engine module, not here.

Each address is one bounded `HTTPListener` (daemon/listener.py: a few threads, header
and body timeouts); a request's length must be a plain `Content-Length`. Refusals are
logged once per engine and reason, then counted in one line per `log_rejections_every_s`.
Requests are answered at once; journal writes happen on one marker thread (so the
journal sees one connection, and a busy journal never delays an answer). An event can
beat the journaling of its own scan id (the pipeline commits a batch of submissions
at once), so an announcement no row waits for is tried again for a few minutes.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from daemon.engines._webhook import webhook_path
from daemon.engines.base import WebhookSource
from daemon.errors import JournalError, ListenError, WebhookRejectedError
from daemon.journal import Journal
from daemon.listener import HTTPListener, ListenerLimits
from daemon.model import RejectReason

__all__ = ["WebhookReceivers"]

log = structlog.get_logger("scanwatch.webhooks")

_MAX_BODY_BYTES = 1 << 20
_CONTENT_LENGTH = re.compile(r"[0-9]{1,16}")  # ASCII digits only: str.isdigit() takes "²" too
_LOG_REJECTIONS_EVERY_S = 60.0
_LIMITS = ListenerLimits()
_QUEUE_SIZE = 10_000
# After each miss: a batch of large uploads can journal its scan ids minutes late.
_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)


def _body_length(headers: Message) -> int:
    """The body's length from one plain `Content-Length`; raises `WebhookRejectedError`."""
    lengths = {value.strip() for value in headers.get_all("Content-Length") or []}
    if headers.get("Transfer-Encoding") is not None:  # no chunked bodies; both at once smell of smuggling
        raise WebhookRejectedError(400 if lengths else 411, RejectReason.TRANSFER_ENCODING)
    if not lengths:
        raise WebhookRejectedError(411, RejectReason.NO_LENGTH)
    value = lengths.pop()
    if lengths or not _CONTENT_LENGTH.fullmatch(value):
        raise WebhookRejectedError(400, RejectReason.BAD_LENGTH)
    if int(value) > _MAX_BODY_BYTES:
        raise WebhookRejectedError(413, RejectReason.TOO_LARGE)
    return int(value)


class _RejectionLog:
    """Logs the first refusal of each engine and reason, then one line with a `count` per
    interval; thread-safe."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._logged_at: dict[tuple[str, RejectReason], float] = {}
        self._unlogged: dict[tuple[str, RejectReason], int] = {}

    def rejected(self, engine: str, reason: RejectReason, client: str) -> None:
        """One refusal: logged now unless its kind was logged less than `every_s` ago."""
        key, now = (engine, reason), self._clock()
        with self._lock:
            count = self._unlogged.pop(key, 0) + 1
            if now - self._logged_at.get(key, -self.every_s) < self.every_s:
                self._unlogged[key] = count
                return
            self._logged_at[key] = now
        log.warning("webhook.rejected", engine=engine, reason=reason, client=client, count=count)

    def flush(self, *, everything: bool = False) -> None:
        """Log the counts whose interval has passed (all of them with `everything`)."""
        now = self._clock()
        with self._lock:
            due = {key: count for key, count in self._unlogged.items()
                   if everything or now - self._logged_at[key] >= self.every_s}
            for key in due:
                del self._unlogged[key]
                self._logged_at[key] = now
        for (engine, reason), count in sorted(due.items()):
            log.warning("webhook.rejected", engine=engine, reason=reason, count=count)


@dataclass(frozen=True)
class _Announcement:
    """A verified delivery's scans, to be made due; `misses` counts tries that found no row."""

    engine: str
    scan_ids: list[str]
    misses: int = 0


def _routes(engines: Iterable[object]) -> dict[str, dict[str, WebhookSource]]:
    """The engines that take deliveries, by listen address, then by path."""
    routes: dict[str, dict[str, WebhookSource]] = {}
    for engine in engines:
        if isinstance(engine, WebhookSource) and engine.webhook_address is not None:
            routes.setdefault(engine.webhook_address.listen, {})[webhook_path(engine.name)] = engine
    return routes


class WebhookReceivers:
    """The webhook servers of a set of engines; `start()` binds them, `stop()` closes them."""

    def __init__(self, engines: Mapping[str, object], journal: Journal, wake: threading.Event, *,
                 clock: Callable[[], float] = time.time, limits: ListenerLimits = _LIMITS,
                 log_rejections_every_s: float = _LOG_REJECTIONS_EVERY_S) -> None:
        self._routes = _routes(engines.values())
        self._limits = limits
        self._rejections = _RejectionLog(log_rejections_every_s)
        self._journal = journal
        self._wake = wake
        self._clock = clock
        self._queue: queue.Queue[_Announcement | None] = queue.Queue(_QUEUE_SIZE)
        self._servers: list[HTTPListener] = []
        self._threads: list[threading.Thread] = []

    def start(self, *, must_bind: bool = False) -> None:
        """Bind every listen address and serve.

        An address that cannot be bound raises `ListenError` with `must_bind` (the daemon's
        start: the config needs fixing), else it is logged and left to polling (a reload).
        """
        for listen, routes in self._routes.items():
            key = _address_key(routes)
            try:
                server = HTTPListener(key, listen, self._handler(routes),
                                      name=f"webhooks-{listen.rpartition(':')[2]}", limits=self._limits)
            except ListenError as exc:
                if must_bind:
                    self.stop()
                    raise
                log.error("webhook.listen_failed", listen=listen, engines=_engines(routes),
                          error=str(exc.__cause__))
                continue
            self._servers.append(server)
            server.start()
            for engine in routes.values():
                engine.webhook_health.receiving()
            log.info("webhook.listening", listen=listen, engines=_engines(routes))
        if self._servers:
            self._spawn(self._mark_all, "webhooks-journal")

    def stop(self) -> None:
        """Close the servers; announcements not yet journaled are dropped (polling remains)."""
        for server in self._servers:
            server.stop()
        for routes in self._routes.values():
            for engine in routes.values():
                engine.webhook_health.stopped()
        if self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(5)
        self._servers.clear()
        self._threads.clear()
        self._rejections.flush(everything=True)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _mark_all(self) -> None:
        """Make announced scans due in the journal; try the ones no row waits for again later."""
        later: list[tuple[float, int, _Announcement]] = []  # a heap by due time
        order = itertools.count()
        while True:
            self._rejections.flush()  # this thread also times the refusal counts
            wait_s = self._rejections.every_s
            if later:
                wait_s = min(wait_s, max(0.0, later[0][0] - time.monotonic()))
            try:
                due = [self._queue.get(timeout=wait_s)]
            except queue.Empty:
                due = []
            if due and due[0] is None:
                return
            while later and later[0][0] <= time.monotonic():
                due.append(heapq.heappop(later)[2])
            for announcement in due:
                assert announcement is not None
                missed = self._mark(announcement)
                if missed is not None and len(later) < _QUEUE_SIZE:
                    retry_at = time.monotonic() + _RETRY_DELAYS_S[announcement.misses]
                    heapq.heappush(later, (retry_at, next(order), missed))

    def _mark(self, announcement: _Announcement) -> _Announcement | None:
        """Make the announced scan due; returns the announcement to try again, if any."""
        engine, scan_ids = announcement.engine, announcement.scan_ids
        try:
            marked = self._journal.mark_scan_due(engine, scan_ids, self._clock())
        except JournalError as exc:
            log.warning("webhook.not_journaled", engine=engine, error=str(exc))
            marked = 0
        if marked:
            log.info("webhook.scan_due", engine=engine, engine_scan_ids=scan_ids)
            self._wake.set()
            return None
        if announcement.misses == 0:
            # Not journaled yet, claimed mid-poll, already due or done, or unknown.
            log.debug("webhook.unmatched", engine=engine, engine_scan_ids=scan_ids)
        if announcement.misses + 1 >= len(_RETRY_DELAYS_S):
            return None
        return replace(announcement, misses=announcement.misses + 1)

    def _accept(self, engine: WebhookSource, headers: Message, body: bytes) -> None:
        """Verify and queue one delivery; raises `WebhookRejectedError` if it is refused."""
        engine.verify_webhook(headers, body, self._clock())
        scan_ids = engine.webhook_scan_ids(body)
        engine.webhook_health.receiving()
        log.debug("webhook.received", engine=engine.name, engine_scan_ids=scan_ids)
        if scan_ids:
            try:
                self._queue.put_nowait(_Announcement(engine.name, scan_ids))
            except queue.Full:
                raise WebhookRejectedError(503, RejectReason.BUSY) from None  # the vendor delivers again

    def _handler(self, routes: Mapping[str, WebhookSource]) -> type[BaseHTTPRequestHandler]:
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                engine = routes.get(self.path)
                if engine is None:
                    return self._answer(404)
                try:
                    length = _body_length(self.headers)
                except WebhookRejectedError as exc:
                    return self._answer(exc.status)
                body = self.rfile.read(length)
                if len(body) < length:
                    return None  # the client left mid-body
                try:
                    receivers._accept(engine, self.headers, body)
                except WebhookRejectedError as exc:
                    receivers._rejections.rejected(engine.name, exc.reason, self.client_address[0])
                    return self._answer(exc.status)
                self._answer(204)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(405)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


def _engines(routes: Mapping[str, WebhookSource]) -> list[str]:
    return sorted(engine.name for engine in routes.values())


def _address_key(routes: Mapping[str, WebhookSource]) -> str:
    """The config key of an address, for a `ListenError` (the first engine that set it)."""
    address = next(iter(routes.values())).webhook_address
    assert address is not None  # only engines with an address are routed
    return address.key
