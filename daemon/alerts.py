"""Outcome notifications: a JSON POST to `notify.webhook` for every infected or failed file,
and for a file held with `permission_denied`.

A bounded queue and one sender thread keep the pipeline from ever waiting on the
webhook; the sender retries with backoff and drops (and logs) what it cannot deliver.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
import time
from typing import Any

import httpx
import structlog

from daemon.config import NotifyConfig, WatchConfig
from daemon.journal import FileRow
from daemon.model import Reason, VerdictKind
from daemon.outcome_facts import outcome_facts
from daemon.pipeline.outcome import Outcome
from daemon.retry import RetryPolicy

__all__ = ["WebhookAlerts"]

log = structlog.get_logger("scanwatch.alerts")

_QUEUE_SIZE = 10_000


class WebhookAlerts:
    """Posts `file.infected` and `file.failed` events to a webhook from its own thread."""

    def __init__(self, config: NotifyConfig, *, policy: RetryPolicy | None = None) -> None:
        self._config = config
        self._policy = policy or RetryPolicy(base_s=1.0, max_s=60.0)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(_QUEUE_SIZE)
        self._thread = threading.Thread(target=self._send_all, name="alerts", daemon=True)
        self._thread.start()

    def observe(self, watch: WatchConfig, row: FileRow, outcome: Outcome) -> None:
        """Queue an event for a file that just reached quarantine or failed, or that is held
        because the daemon may not take it out of its folder (reported once); never blocks."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if outcome.event == "file.skipped" and outcome.fields.get("reason") == Reason.PERMISSION_DENIED:
            event: dict[str, Any] = {"event": "file.permission_denied", "watch": row.watch,
                                     "rel_path": row.rel_path, "detail": outcome.fields.get("detail"),
                                     "at": at}
        elif outcome.event != "file.moved" or row.verdict == VerdictKind.CLEAN:
            return
        else:
            event = {"event": f"file.{row.verdict}", "watch": row.watch, "rel_path": row.rel_path,
                     **outcome_facts(watch, row, str(outcome.fields["destination"])), "at": at}
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("alert.dropped", reason="queue full", watch=row.watch, rel_path=row.rel_path)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop after what is queued, waiting at most `timeout_s`."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout_s)

    def _send_all(self) -> None:
        """Send events as they come; a failed one is tried again on its schedule while others go on."""
        url = self._config.webhook.get_secret_value()
        retries: list[tuple[float, int, int, dict[str, Any]]] = []  # (due, seq, attempt, event)
        seq = itertools.count()
        with httpx.Client(timeout=self._config.timeout) as client:
            while True:
                wait_s = max(0.0, retries[0][0] - time.monotonic()) if retries else None
                try:
                    event = self._queue.get(timeout=wait_s)
                except queue.Empty:
                    _, _, attempt, event = heapq.heappop(retries)
                else:
                    if event is None:  # closing: what waits for a retry gets one last try
                        for _, _, _, waiting in retries:
                            self._send(client, url, waiting, self._config.max_attempts)
                        return
                    attempt = 1
                if not self._send(client, url, event, attempt):
                    due = time.monotonic() + self._policy.delay(attempt)
                    heapq.heappush(retries, (due, next(seq), attempt + 1, event))

    def _send(self, client: httpx.Client, url: str, event: dict[str, Any], attempt: int) -> bool:
        """One delivery attempt; False when another one is due."""
        try:
            response = client.post(url, json=event)
            if response.status_code < 300:
                return True
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__  # the URL may carry a token: never log it
        if attempt < self._config.max_attempts:
            return False
        log.warning("alert.failed", error=error, attempts=self._config.max_attempts,
                    watch=event["watch"], rel_path=event["rel_path"])
        return True
