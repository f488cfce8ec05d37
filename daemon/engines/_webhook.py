"""What the engines that take webhooks share: their path, their health, and body helpers.

The receiver (daemon/webhooks.py) routes `POST /webhooks/<engine>` to each engine that
implements `WebhookSource` (daemon/engines/base.py); how a vendor signs and shapes its
deliveries lives in that engine's module. This module depends on neither, so engines
never import the receiver.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.config import WebhookConfig
from daemon.errors import WebhookRejectedError
from daemon.model import RejectReason

__all__ = ["WebhookAddress", "WebhookHealth", "json_body", "secret_bytes", "webhook_address", "webhook_path"]

_HEALTHY_FOR_S = 600.0  # deliveries count as flowing this long after the last one
_SLOW_FACTOR = 10.0
_SLOW_MAX_S = 60.0


def webhook_path(engine: str) -> str:
    """The path an engine's deliveries are posted to."""
    return f"/webhooks/{engine}"


@dataclass(frozen=True)
class WebhookAddress:
    """Where an engine's deliveries are received, and the config key that says so."""

    listen: str  # host:port
    key: str  # e.g. `engines.blz.webhook.listen`, for a ListenError


def webhook_address(engine: str, section: str, config: WebhookConfig | None) -> WebhookAddress | None:
    """The address of an engine's `section` (`webhook`, `callback`), None if not configured."""
    if config is None:
        return None
    return WebhookAddress(config.listen, f"engines.{engine}.{section}.listen")


def secret_bytes(config: WebhookConfig | None) -> bytes:
    """The configured shared secret; only engines with an address are routed deliveries."""
    if config is None:
        raise RuntimeError("no webhook is configured for this engine")
    return config.secret.get_secret_value().encode()


def json_body(body: bytes) -> dict[str, Any]:
    """A delivery's JSON object; raises `WebhookRejectedError` (400) for anything else."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise WebhookRejectedError(400, RejectReason.BAD_JSON) from None
    if not isinstance(payload, dict):
        raise WebhookRejectedError(400, RejectReason.BAD_JSON)
    return payload


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
