"""What the HTTP engines share: httpx errors translated at the boundary, status mapping,
Retry-After parsing and a client-side rate limit. One vendor's details stay in its module."""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from daemon import __version__
from daemon.errors import EnginePermanentError, EngineRetryableError, EngineUnavailableError
from daemon.model import Reason

__all__ = ["USER_AGENT", "RateLimiter", "api_client", "check_status", "json_object", "parse_retry_after",
           "translate_errors"]

USER_AGENT = f"scanwatch/{__version__}"

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@contextmanager
def translate_errors(engine: str, url: str) -> Iterator[None]:
    """httpx errors become engine errors: nothing above an engine sees httpx."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise EngineUnavailableError(f"engine {engine!r} cannot reach {url}: {exc}; "
                                     f"check the service or engines.{engine}.url") from exc
    except httpx.TimeoutException as exc:
        raise EngineRetryableError(f"engine {engine!r}: {url} timed out", reason=Reason.TIMEOUT) from exc
    except httpx.TransportError as exc:
        raise EngineRetryableError(f"engine {engine!r}: {url}: {type(exc).__name__}: {exc}") from exc


def check_status(response: httpx.Response, engine: str, body: str = "", *,
                 retryable: bool = False, reason: Reason | None = None) -> None:
    """Raise the engine error a non-2xx answer means (docs/engines.md#retries).

    A vendor's documented exceptions override the status's usual meaning: a permanent
    `reason` (MetaDefender's 500 "license expired"), or `retryable` (its 403 "scan limit").
    """
    status = response.status_code
    if status < 300:
        return
    detail = f"engine {engine!r}: HTTP {status} from {response.request.method} " \
             f"{response.request.url.path}: {body or response.text[:200]}"
    if reason is not None:
        raise EnginePermanentError(detail, reason=reason)
    if retryable or status in _RETRYABLE_STATUS:
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        raise EngineRetryableError(detail, retry_after_s=retry_after_s)
    if status in (401, 403):
        raise EnginePermanentError(detail + f"; check engines.{engine} credentials", reason=Reason.AUTH)
    if status == 413:
        raise EnginePermanentError(detail, reason=Reason.TOO_LARGE)
    raise EnginePermanentError(detail, reason=Reason.BAD_REQUEST)


def api_client(url: str, timeout: float, credentials: dict[str, str]) -> httpx.Client:
    """The client of one engine's API: base URL, timeout, credential headers, our User-Agent."""
    return httpx.Client(base_url=url, timeout=timeout, headers={**credentials, "User-Agent": USER_AGENT})


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class RateLimiter:
    """At most `per_minute` requests a minute, spread evenly; the server's word wins."""

    def __init__(self, per_minute: float) -> None:
        self._interval_s = 60.0 / per_minute
        self._next_at = 0.0
        self._lock = threading.Lock()

    def acquire(self, max_wait_s: float = 2.0) -> None:
        """Wait for the next slot; a longer hold is a retry the pipeline schedules, not a sleep."""
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next_at)
            if at - now > max_wait_s:
                raise EngineRetryableError("rate limited: waiting for the server's window",
                                           retry_after_s=at - now)
            self._next_at = at + self._interval_s
        if at > now:
            time.sleep(at - now)

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` (Retry-After, or an exhausted X-RateLimit-Remaining)."""
        with self._lock:
            self._next_at = max(self._next_at, time.monotonic() + seconds)

    def observe(self, response: httpx.Response) -> None:
        """Follow X-RateLimit-Remaining/Reset and Retry-After of an answer."""
        if (retry_after_s := parse_retry_after(response.headers.get("Retry-After"))) is not None:
            self.hold(retry_after_s)
        elif response.headers.get("X-RateLimit-Remaining") == "0":
            reset = response.headers.get("X-RateLimit-Reset", "")
            if reset.isdigit():
                # Either seconds to wait or a unix time; a value past 1e9 is a time.
                value = float(reset)
                self.hold(value - time.time() if value > 1e9 else value)
