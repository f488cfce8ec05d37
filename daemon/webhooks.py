"""Webhook receivers: vendors announce finished scans, and the announced file is polled now.

A verified delivery never writes a verdict from its body: it makes the journal row
that waits for that engine scan due at once and wakes the pipeline, whose worker
then asks the engine through its authenticated API. So a forged or replayed event
can at worst cause one early poll, and every delivery is idempotent. Polling stays
the safety net: while deliveries arrive (`WebhookHealth`), engines only poll slower.

One threaded HTTP server per distinct `listen` address routes `POST /webhooks/<engine>`:
- Blazelock (vendors.md §1): `X-Blazelock-Webhook-Signature` is the hex HMAC-SHA256 of
  `"{X-Blazelock-Webhook-Timestamp}.{raw body}"` with the secret; stale timestamps are
  refused. `file_scan.completed|failed` mark the scan due; `submitted` is acknowledged.
- Perception Point (vendors.md §2): the engine asks for a callback carrying our secret
  in `X-Scanwatch-Callback-Secret`; the callback's `scan_id` is marked due.

Each address is one bounded `HTTPListener` (daemon/listener.py: a few threads, header
and body timeouts); a request's length must be a plain `Content-Length`. Refusals are
logged once per engine and reason, then counted in one line per `log_rejections_every_s`.
Requests are answered at once; journal writes happen on one marker thread (so the
journal sees one connection, and a busy journal never delays an answer). An event can
beat the journaling of its own scan id (the pipeline commits a batch of submissions
at once), so an announcement no row waits for is tried again for a few minutes.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol, runtime_checkable

import structlog
from pydantic import SecretStr

from daemon.config import BlazelockEngineConfig, Config, PerceptionPointEngineConfig, WebhookConfig
from daemon.errors import JournalError, ListenError
from daemon.journal import Journal
from daemon.listener import HTTPListener, ListenerLimits

__all__ = ["CALLBACK_SECRET_HEADER", "WebhookHealth", "WebhookReceivers", "webhook_path"]

log = structlog.get_logger("scanwatch.webhooks")

CALLBACK_SECRET_HEADER = "X-Scanwatch-Callback-Secret"
_MAX_SKEW_S = 300.0  # vendors.md §1: refuse timestamps older than 5 minutes (and as far ahead)
_MAX_BODY_BYTES = 1 << 20
_CONTENT_LENGTH = re.compile(r"[0-9]{1,16}")  # ASCII digits only: str.isdigit() takes "²" too
_LOG_REJECTIONS_EVERY_S = 60.0
_LIMITS = ListenerLimits()
_QUEUE_SIZE = 10_000
_HEALTHY_FOR_S = 600.0  # deliveries count as flowing this long after the last one
_SLOW_FACTOR = 10.0
_SLOW_MAX_S = 60.0
# After each miss: a batch of large uploads can journal its scan ids minutes late.
_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)


def webhook_path(engine: str) -> str:
    """The path an engine's deliveries are posted to."""
    return f"/webhooks/{engine}"


class WebhookHealth:
    """Whether an engine's webhooks arrive, so its polls can slow down; thread-safe.

    Healthy from the receiver's start until `healthy_for_s` pass without a verified
    delivery.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 healthy_for_s: float = _HEALTHY_FOR_S) -> None:
        self._clock = clock
        self._healthy_for_s = healthy_for_s
        self._last_at: float | None = None
        self._lock = threading.Lock()

    def receiving(self) -> None:
        """The receiver started or a verified delivery arrived."""
        with self._lock:
            self._last_at = self._clock()

    def stopped(self) -> None:
        """The receiver stopped: poll at the normal pace again."""
        with self._lock:
            self._last_at = None

    @property
    def is_healthy(self) -> bool:
        """Deliveries arrive (or the receiver has just started)."""
        with self._lock:
            return self._last_at is not None and self._clock() - self._last_at < self._healthy_for_s

    def poll_after_s(self, poll_interval_s: float) -> float:
        """When to poll a running scan next: slower while deliveries arrive."""
        if self.is_healthy:
            return max(poll_interval_s, min(poll_interval_s * _SLOW_FACTOR, _SLOW_MAX_S))
        return poll_interval_s


@runtime_checkable
class _HasWebhookHealth(Protocol):
    """An engine that adapts its polling to its webhooks."""

    webhook_health: WebhookHealth


@dataclass(frozen=True)
class _Rejection:
    status: int
    reason: str


_Verifier = Callable[[bytes, Message, bytes, float], _Rejection | None]


def _verify_blazelock(secret: bytes, headers: Message, body: bytes, now: float) -> _Rejection | None:
    """None if the delivery is signed with `secret` and fresh, else why it is refused."""
    timestamp = headers.get("X-Blazelock-Webhook-Timestamp")
    signature = headers.get("X-Blazelock-Webhook-Signature")
    if not timestamp or not signature:
        return _Rejection(401, "missing_headers")
    if not timestamp.isdigit():
        return _Rejection(400, "bad_timestamp")
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        return _Rejection(401, "bad_signature")
    if abs(now - int(timestamp)) > _MAX_SKEW_S:
        return _Rejection(401, "stale_timestamp")
    return None


def _verify_callback(secret: bytes, headers: Message, body: bytes, now: float) -> _Rejection | None:
    """None if the callback carries the secret header we asked Perception Point to send."""
    given = headers.get(CALLBACK_SECRET_HEADER)
    if not given:
        return _Rejection(401, "missing_headers")
    if not hmac.compare_digest(secret, given.encode()):
        return _Rejection(401, "bad_secret")
    return None


def _blazelock_scan_ids(event: dict[str, Any]) -> list[str]:
    """The journal's ids of the scan a finished-scan event names (none for other events)."""
    if event.get("event") not in ("file_scan.completed", "file_scan.failed"):
        return []
    scan = event.get("data")
    if isinstance(scan, dict) and isinstance(scan.get("data"), dict):
        scan = scan["data"]  # the scan object's own envelope is optional (vendors.md §1)
    if not isinstance(scan, dict):
        return []
    ids = [str(scan["id"])] if scan.get("id") else []
    attributes = scan.get("attributes")
    if isinstance(attributes, dict) and attributes.get("external_reference_id"):
        # A scan the engine could not see yet is journaled by reference (BlazelockEngine).
        ids.append(f"ref:{attributes['external_reference_id']}")
    return ids


def _callback_scan_ids(result: dict[str, Any]) -> list[str]:
    """The scan id of a Perception Point callback."""
    scan_id = result.get("scan_id")
    return [str(scan_id)] if isinstance(scan_id, int | str) and str(scan_id) else []


def _body_length(headers: Message) -> int | _Rejection:
    """The body's length from one plain `Content-Length`, or why the request is refused."""
    lengths = {value.strip() for value in headers.get_all("Content-Length") or []}
    if headers.get("Transfer-Encoding") is not None:  # no chunked bodies; both at once smell of smuggling
        return _Rejection(400 if lengths else 411, "transfer_encoding")
    if not lengths:
        return _Rejection(411, "no_length")
    value = lengths.pop()
    if lengths or not _CONTENT_LENGTH.fullmatch(value):
        return _Rejection(400, "bad_length")
    if int(value) > _MAX_BODY_BYTES:
        return _Rejection(413, "too_large")
    return int(value)


class _RejectionLog:
    """Logs the first refusal of each engine and reason, then one line with a `count` per
    interval; thread-safe."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._logged_at: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    def rejected(self, engine: str, reason: str, client: str) -> None:
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
class _Route:
    engine: str
    listen_key: str
    secret: SecretStr
    health: WebhookHealth
    verify: _Verifier
    scan_ids: Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class _Announcement:
    """A verified delivery's scans, to be made due; `misses` counts tries that found no row."""

    route: _Route
    scan_ids: list[str]
    misses: int = 0


def _routes(config: Config, engines: Mapping[str, object]) -> dict[str, dict[str, _Route]]:
    """Routes by listen address, then by path."""
    routes: dict[str, dict[str, _Route]] = {}
    for name, engine_cfg in config.engines.items():
        webhook: WebhookConfig | None
        key: str
        verify: _Verifier
        scan_ids: Callable[[dict[str, Any]], list[str]]
        if isinstance(engine_cfg, BlazelockEngineConfig):
            webhook, key = engine_cfg.webhook, f"engines.{name}.webhook.listen"
            verify, scan_ids = _verify_blazelock, _blazelock_scan_ids
        elif isinstance(engine_cfg, PerceptionPointEngineConfig):
            webhook, key = engine_cfg.callback, f"engines.{name}.callback.listen"
            verify, scan_ids = _verify_callback, _callback_scan_ids
        else:
            continue
        if webhook is None:
            continue
        engine = engines.get(name)
        health = engine.webhook_health if isinstance(engine, _HasWebhookHealth) else WebhookHealth()
        routes.setdefault(webhook.listen, {})[webhook_path(name)] = _Route(
            name, key, webhook.secret, health, verify, scan_ids)
    return routes


class WebhookReceivers:
    """The webhook servers of one config; `start()` binds them, `stop()` closes them."""

    def __init__(self, config: Config, engines: Mapping[str, object], journal: Journal,
                 wake: threading.Event, *, clock: Callable[[], float] = time.time,
                 limits: ListenerLimits = _LIMITS,
                 log_rejections_every_s: float = _LOG_REJECTIONS_EVERY_S) -> None:
        self._routes = _routes(config, engines)
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
            try:
                server = HTTPListener(next(iter(routes.values())).listen_key, listen,
                                      self._handler(routes), name=f"webhooks-{listen.rpartition(':')[2]}",
                                      limits=self._limits)
            except ListenError as exc:
                if must_bind:
                    self.stop()
                    raise
                log.error("webhook.listen_failed", listen=listen, engines=_engines(routes),
                          error=str(exc.__cause__))
                continue
            self._servers.append(server)
            server.start()
            for route in routes.values():
                route.health.receiving()
            log.info("webhook.listening", listen=listen, engines=_engines(routes))
        if self._servers:
            self._spawn(self._mark_all, "webhooks-journal")

    def stop(self) -> None:
        """Close the servers; announcements not yet journaled are dropped (polling remains)."""
        for server in self._servers:
            server.stop()
        for routes in self._routes.values():
            for route in routes.values():
                route.health.stopped()
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
        route, scan_ids = announcement.route, announcement.scan_ids
        try:
            marked = self._journal.mark_scan_due(route.engine, scan_ids, self._clock())
        except JournalError as exc:
            log.warning("webhook.not_journaled", engine=route.engine, error=str(exc))
            marked = 0
        if marked:
            log.info("webhook.scan_due", engine=route.engine, engine_scan_ids=scan_ids)
            self._wake.set()
            return None
        if announcement.misses == 0:
            # Not journaled yet, claimed mid-poll, already due or done, or unknown.
            log.debug("webhook.unmatched", engine=route.engine, engine_scan_ids=scan_ids)
        if announcement.misses + 1 >= len(_RETRY_DELAYS_S):
            return None
        return replace(announcement, misses=announcement.misses + 1)

    def _accept(self, route: _Route, headers: Message, body: bytes) -> _Rejection | None:
        """Verify and queue one delivery; None when it was accepted."""
        rejection = route.verify(route.secret.get_secret_value().encode(), headers, body, self._clock())
        if rejection is not None:
            return rejection
        try:
            payload = json.loads(body)
        except ValueError:
            return _Rejection(400, "bad_json")
        if not isinstance(payload, dict):
            return _Rejection(400, "bad_json")
        route.health.receiving()
        scan_ids = route.scan_ids(payload)
        log.debug("webhook.received", engine=route.engine, kind=payload.get("event", "callback"),
                  engine_scan_ids=scan_ids)
        if scan_ids:
            try:
                self._queue.put_nowait(_Announcement(route, scan_ids))
            except queue.Full:
                return _Rejection(503, "busy")  # the vendor delivers again later
        return None

    def _handler(self, routes: Mapping[str, _Route]) -> type[BaseHTTPRequestHandler]:
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                route = routes.get(self.path)
                if route is None:
                    return self._answer(404)
                length = _body_length(self.headers)
                if isinstance(length, _Rejection):
                    return self._answer(length.status)
                body = self.rfile.read(length)
                if len(body) < length:
                    return None  # the client left mid-body
                rejection = receivers._accept(route, self.headers, body)
                if rejection is None:
                    return self._answer(204)
                receivers._rejections.rejected(route.engine, rejection.reason, self.client_address[0])
                self._answer(rejection.status)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(405)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


def _engines(routes: Mapping[str, _Route]) -> list[str]:
    return sorted(route.engine for route in routes.values())
