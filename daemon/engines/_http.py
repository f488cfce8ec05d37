"""What the HTTP engines share: one paced client per engine, httpx errors translated at the
boundary, status mapping and Retry-After parsing. One vendor's details stay in its module."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from daemon import __version__
from daemon.engines._pacing import Pacer
from daemon.errors import (
    EngineBrokenError,
    EnginePermanentError,
    EngineRetryableError,
    EngineThrottledError,
    EngineUnavailableError,
)
from daemon.model import Reason

__all__ = ["USER_AGENT", "PacedClient", "check_status", "json_object", "parse_retry_after",
           "translate_errors"]

USER_AGENT = f"scanwatch/{__version__}"

# docs/engines.md#retries: "slow down" is pacing and spends no attempt; the rest may hide a fault.
_THROTTLE_STATUS = frozenset({429, 503})
_RETRYABLE_STATUS = frozenset({500, 502, 504})


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
                 reason: Reason | None = None) -> None:
    """Raise the engine error a non-2xx answer means (docs/engines.md#retries).

    A vendor's documented exception overrides the status's usual meaning: `reason` given,
    the engine is broken for every file (MetaDefender's 500 "license expired"):
    `EngineBrokenError` with that reason.
    """
    status = response.status_code
    if status < 300:
        return
    detail = f"engine {engine!r}: HTTP {status} from {response.request.method} " \
             f"{response.request.url.path}: {body or response.text[:200]}"
    retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
    if reason is not None:
        raise EngineBrokenError(detail, reason=reason)
    if status in _THROTTLE_STATUS:
        raise EngineThrottledError(detail, retry_after_s=retry_after_s)
    if status in _RETRYABLE_STATUS:
        raise EngineRetryableError(detail, retry_after_s=retry_after_s)
    if status in (401, 403):
        raise EnginePermanentError(detail + f"; check engines.{engine} credentials", reason=Reason.AUTH)
    if status == 413:
        raise EnginePermanentError(detail, reason=Reason.TOO_LARGE)
    raise EnginePermanentError(detail, reason=Reason.BAD_REQUEST)


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class PacedClient:
    """One engine's API client: every request paced by the engine's one `Pacer`
    (daemon/engines/_pacing.py), httpx errors translated, throttling answers raised.

    `is_throttled` adds a vendor's own "busy" answers to 429 and 503 (MetaDefender's 403
    "scan limit reached"). Thread-safe, as httpx's client and the pacer are.
    """

    def __init__(self, engine: str, url: str, timeout: float, credentials: dict[str, str], pacer: Pacer,
                 is_throttled: Callable[[httpx.Response], bool] = lambda _: False) -> None:
        self.engine = engine
        self.url = url
        self.pacer = pacer
        self._is_throttled = is_throttled
        self._client = httpx.Client(base_url=url, timeout=timeout,
                                    headers={**credentials, "User-Agent": USER_AGENT})

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request in its turn; raises `EngineThrottledError` on a throttling answer."""
        self.pacer.acquire()
        with translate_errors(self.engine, path if "://" in path else self.url + path):
            response = self._client.request(method, path, **kwargs)
        self._answered(response)
        return response

    def close(self) -> None:
        """Close the connection pool and the pacing state."""
        self._client.close()
        self.pacer.close()

    def _answered(self, response: httpx.Response) -> None:
        """Pace by the answer: slow down on a throttle (raised, with the wait), else speed up."""
        status = response.status_code
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        if status in _THROTTLE_STATUS or self._is_throttled(response):
            wait_s = self.pacer.throttled(retry_after_s)
            raise EngineThrottledError(
                f"engine {self.engine!r}: HTTP {status} from {response.request.method} "
                f"{response.request.url.path}: {response.text[:200]}; paced at "
                f"{self.pacer.rate_per_minute:.4g} requests a minute", retry_after_s=wait_s)
        if status < 500:
            self.pacer.succeeded()
        if retry_after_s is not None:
            self.pacer.hold(retry_after_s)
        elif response.headers.get("X-RateLimit-Remaining") == "0":
            reset = response.headers.get("X-RateLimit-Reset", "")
            if reset.isdigit():
                # Either seconds to wait or a unix time; a value past 1e9 is a time.
                value = float(reset)
                self.pacer.hold(value - time.time() if value > 1e9 else value)
