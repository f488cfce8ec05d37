"""Outcome notifications: a JSON POST to `notify.webhook` for every infected or failed file.

A bounded queue and one sender thread keep the pipeline from ever waiting on the
webhook; the sender retries with backoff and drops (and logs) what it cannot deliver.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from daemon.config import Config, NotifyConfig
from daemon.journal import FileRow
from daemon.model import FileState, VerdictKind
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

    def observe(self, config: Config, row: FileRow, changes: Mapping[str, object]) -> None:
        """Queue an event for a file that just reached quarantine or failed; never blocks."""
        if changes.get("state") is not FileState.DONE or row.verdict == VerdictKind.CLEAN:
            return
        watch = config.watch(row.watch)
        event = {
            "event": f"file.{row.verdict}", "watch": row.watch, "rel_path": row.rel_path,
            "source": f"{watch.source}/{row.rel_path}", "destination": changes.get("destination"),
            "verdict": row.verdict, "reason": row.reason, "threats": row.threats or [],
            "engine": watch.engine, "engine_scan_id": row.engine_scan_id,
            "external_reference_id": row.ref_id, "sha256": row.sha256, "size": row.size,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
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
        url = self._config.webhook.get_secret_value()
        with httpx.Client(timeout=self._config.timeout) as client:
            while (event := self._queue.get()) is not None:
                self._send(client, url, event)

    def _send(self, client: httpx.Client, url: str, event: dict[str, Any]) -> None:
        for attempt in range(1, self._config.max_attempts + 1):
            try:
                response = client.post(url, json=event)
                if response.status_code < 300:
                    return
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__  # the URL may carry a token: never log it
            if attempt < self._config.max_attempts:
                time.sleep(self._policy.delay(attempt))
        log.warning("alert.failed", error=error, attempts=self._config.max_attempts,
                    watch=event["watch"], rel_path=event["rel_path"])
